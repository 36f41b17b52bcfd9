"""Which models are served, learned from Redis: live workers' heartbeats name their model, and
each model's hash (`spindle:model:{model}`) carries its tokenizer and limits.

A model is served while at least one live (unexpired) worker key names it. Tokenizers are built
once per model and rebuilt when the hash changes; the change check is a cheap fingerprint (field
lengths plus the small fields), made at most once per `refresh_s`, so a request does not fetch a
multi-megabyte tokenizer.json.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from transformers import PreTrainedTokenizerFast

from common.chat import ModelCard, build_tokenizer, special_token_ids
from common.keys import Keys
from gateway.errors import ApiError

logger = logging.getLogger("spindle.gateway")

_LARGE_FIELDS = (
    "tokenizer_json",
    "tokenizer_config_json",
    "chat_template",
    "generation_config_json",
)
_SMALL_FIELDS = ("max_input_tokens", "max_total_tokens", "eos_token_ids")


@dataclass(frozen=True)
class WorkerStatus:
    """One worker's heartbeat (`spindle:worker:{id}`), as the worker wrote it."""

    id: str
    model: str
    device: str = ""
    dtype: str = ""
    shards: int = 1
    running: int = 0
    waiting: int = 0
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0
    version: str = ""
    heartbeat: float = 0.0

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerStatus | None:
        try:
            data = json.loads(raw)
            known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
            return cls(**known)
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class ServedModel:
    """A model's card and the tokenizer rebuilt from it."""

    card: ModelCard
    tokenizer: PreTrainedTokenizerFast
    special_ids: frozenset[int]

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own (the text logprobs and TGI token lists show)."""
        return str(self.tokenizer.decode([token_id]))


@dataclass
class _CacheEntry:
    model: ServedModel
    fingerprint: tuple[Any, ...]
    checked_at: float


class ModelRegistry:
    def __init__(
        self, redis: Redis, keys: Keys, *, workers_ttl_s: float = 0.5, refresh_s: float = 1.0
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._workers_ttl_s = workers_ttl_s
        self._refresh_s = refresh_s
        self._workers: list[WorkerStatus] = []
        self._workers_read_at = -1e9
        self._cache: dict[str, _CacheEntry] = {}
        self._build_lock = asyncio.Lock()

    async def live_workers(self) -> list[WorkerStatus]:
        """Workers whose heartbeat key has not expired (re-read at most every workers_ttl_s)."""
        if time.monotonic() - self._workers_read_at < self._workers_ttl_s:
            return self._workers
        names = [
            name
            async for name in self._redis.scan_iter(match=self._keys.worker_pattern(), count=1000)
        ]
        values = await self._redis.mget(names) if names else []
        statuses = [WorkerStatus.from_json(raw) for raw in values if raw is not None]
        self._workers = [status for status in statuses if status is not None]
        self._workers_read_at = time.monotonic()
        return self._workers

    async def served_models(self) -> list[str]:
        return sorted({worker.model for worker in await self.live_workers()})

    async def get(self, name: str) -> ServedModel:
        """The served model called `name`: 503 if no worker is alive, 404 if none serves it."""
        served = await self.served_models()
        if not served:
            raise ApiError(
                503,
                "no worker is alive; start one (spindle serve / python -m worker)",
                headers={"Retry-After": "1"},
            )
        if name not in served:
            raise ApiError(
                404,
                f"The model '{name}' does not exist. Served models: {', '.join(served)}.",
                param="model",
                code="model_not_found",
            )
        return await self._load(name)

    async def default_model(self) -> ServedModel:
        """The first served model by name: what TGI routes without a model field describe."""
        served = await self.served_models()
        if not served:
            await self.get("")  # raises the 503
        return await self._load(served[0])

    async def _load(self, name: str) -> ServedModel:
        entry = self._cache.get(name)
        now = time.monotonic()
        if entry is not None and now - entry.checked_at < self._refresh_s:
            return entry.model
        fingerprint = await self._fingerprint(name)
        if entry is not None and entry.fingerprint == fingerprint:
            entry.checked_at = now
            return entry.model
        async with self._build_lock:
            return await self._rebuild(name, fingerprint)

    async def _fingerprint(self, name: str) -> tuple[Any, ...]:
        key = self._keys.model(name)
        pipe = self._redis.pipeline(transaction=False)
        for field_name in _LARGE_FIELDS:
            pipe.hstrlen(key, field_name)
        pipe.hmget(key, list(_SMALL_FIELDS))
        results = await pipe.execute()
        return (*results[:-1], *results[-1])

    async def _rebuild(self, name: str, fingerprint: tuple[Any, ...]) -> ServedModel:
        entry = self._cache.get(name)
        if entry is not None and entry.fingerprint == fingerprint:
            return entry.model  # another request rebuilt it while this one waited
        key = self._keys.model(name)
        fields: dict[bytes, bytes] = await self._redis.hgetall(key)  # type: ignore[misc]
        if not fields:
            raise ApiError(
                503,
                f"a worker serves '{name}' but has not registered it in Redis yet; retry shortly",
                headers={"Retry-After": "1"},
            )
        try:
            card = ModelCard.from_hash(name, fields)
            tokenizer = await asyncio.to_thread(build_tokenizer, card)
        except Exception as err:
            logger.exception("cannot build the tokenizer of %s", name)
            raise ApiError(
                503, f"the registration of '{name}' in Redis is unusable: {err}"
            ) from err
        model = ServedModel(card, tokenizer, special_token_ids(tokenizer))
        self._cache[name] = _CacheEntry(model, fingerprint, time.monotonic())
        logger.info("loaded tokenizer of %s (%d tokens in vocabulary)", name, model.vocab_size)
        return model
