"""`spindle queue`: what is queued, running and dead per model, and each worker's load — read
straight from Redis with the same commands a person would type in `redis-cli` (the README lists
them), so the table never shows anything Redis does not hold."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from common.keys import WORKER_GROUP, Keys


def snapshot(client: Any, keys: Keys) -> dict[str, Any]:
    now = time.time()
    workers = _workers(client, keys, now)
    models = sorted(
        set(_names(client, keys.requests("*"), keys.requests("")))
        | set(_names(client, keys.model("*"), keys.model("")))
        | {w["model"] for w in workers if w.get("model")}
    )
    return {
        "time": now,
        "models": [_model_row(client, keys, m, now) for m in models],
        "workers": workers,
    }


def _names(client: Any, pattern: str, prefix: str) -> list[str]:
    return [_text(key)[len(prefix) :] for key in client.scan_iter(match=pattern, count=500)]


def _model_row(client: Any, keys: Keys, model: str, now: float) -> dict[str, Any]:
    stream = keys.requests(model)
    length = client.xlen(stream)
    in_flight, oldest_age = 0, None
    try:
        in_flight = client.xpending(stream, WORKER_GROUP)["pending"]
        groups = {_text(g["name"]): g for g in client.xinfo_groups(stream)}
        last = _text(groups[WORKER_GROUP]["last-delivered-id"]) if WORKER_GROUP in groups else "0-0"
        waiting = client.xrange(stream, min=f"({last}", max="+", count=1)
        if waiting:
            oldest_age = now - int(_text(waiting[0][0]).split("-")[0]) / 1000
    except redis.ResponseError:
        pass  # no stream or no group yet: nothing queued
    return {
        "model": model,
        "queued": max(0, length - in_flight),
        "in_flight": in_flight,
        "oldest_waiting_s": round(oldest_age, 3) if oldest_age is not None else None,
        "dead_letters": client.xlen(keys.dead(model)),
    }


def _workers(client: Any, keys: Keys, now: float) -> list[dict[str, Any]]:
    rows = []
    for key in client.scan_iter(match=keys.worker_pattern(), count=500):
        raw = client.get(key)
        if raw is None:
            continue
        status = json.loads(raw)
        status["heartbeat_age_s"] = round(now - status.get("heartbeat", now), 3)
        rows.append(status)
    return sorted(rows, key=lambda row: (row.get("model", ""), row.get("id", "")))


def render_table(data: dict[str, Any]) -> str:
    lines = ["MODEL                          QUEUED  IN_FLIGHT  OLDEST_WAIT  DEAD"]
    for row in data["models"]:
        age = "-" if row["oldest_waiting_s"] is None else f"{row['oldest_waiting_s']:.1f}s"
        lines.append(
            f"{row['model'][:30]:<30} {row['queued']:>6}  {row['in_flight']:>9}  "
            f"{age:>11}  {row['dead_letters']:>4}"
        )
    lines += [
        "",
        "WORKER                          MODEL                RUNNING  WAITING  KV_USE  HEARTBEAT",
    ]
    for w in data["workers"]:
        total = w.get("kv_total_blocks") or 0
        kv = f"{100 * w.get('kv_used_blocks', 0) / total:.0f}%" if total else "-"
        lines.append(
            f"{w.get('id', '?')[:31]:<31} {w.get('model', '?')[:20]:<20} "
            f"{w.get('running', 0):>7}  {w.get('waiting', 0):>7}  {kv:>6}  "
            f"{w['heartbeat_age_s']:.1f}s ago"
        )
    if not data["workers"]:
        lines.append("(no live worker)")
    return "\n".join(lines)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
