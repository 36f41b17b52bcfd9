"""The spindle gateway: an OpenAI- and TGI-compatible HTTP front end that validates requests,
tokenizes them with the tokenizer the worker published in Redis, queues them on the model's
Redis stream and relays the worker's events back as JSON or Server-Sent Events.

`gateway.app.create_app(settings)` builds the FastAPI app; `python -m gateway` serves it.
"""
