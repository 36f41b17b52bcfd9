"""The gateway's request path stays on the event loop: FastAPI runs a plain-function route or
dependency on its thread pool (a thread hop per request; a burst of 32 started 32 threads and
spread its enqueues over ~50 ms), so every route and dependency of the API is a coroutine."""

from __future__ import annotations

import inspect

from fastapi.routing import APIRoute

from gateway import openai_api, ops_api, tgi_api


def _dependency_calls(dependant) -> list:
    calls = []
    for sub in dependant.dependencies:
        if sub.call is not None:
            calls.append(sub.call)
        calls.extend(_dependency_calls(sub))
    return calls


def test_every_route_and_dependency_is_a_coroutine():
    routers = (openai_api.router, tgi_api.router, ops_api.router)
    routes = [route for router in routers for route in router.routes]
    assert len(routes) >= 8 and all(isinstance(route, APIRoute) for route in routes)
    for route in routes:
        assert inspect.iscoroutinefunction(route.endpoint), route.path
        for call in _dependency_calls(route.dependant):
            assert inspect.iscoroutinefunction(call), (route.path, call)
