"""Which models are served, learned from Redis: live workers' heartbeats name their model, and
each model's hash (`spindle:model:{model}`) carries its tokenizer and limits.

A model is served while at least one live (unexpired) worker key names it. Tokenizers are built
once per model and rebuilt when the hash changes; the change check is a cheap fingerprint (field
lengths plus the small fields), so a request does not fetch a multi-megabyte tokenizer.json.

The gateway keeps this view fresh from a background task (`start()`: the workers and the length
of each served model's stream every `workers_ttl_s`, the fingerprints every `refresh_s`), so a
request reads memory, not Redis: on the demo model the three round trips it took cost ~1.2 ms of
every lone request's TTFT. A request reads Redis itself only when the view is older than
`STALE_PERIODS` refreshes (the task is not running, or Redis fails it), or when it names a model
the view lacks (a worker that just started); TGI's `/info` reads with `max_age_s=0`, and
`/health` pings Redis before it reads the view.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
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
STALE_PERIODS = 3  # a refreshed view is used until this many refresh periods old
MISSING_MODEL_REREAD_S = 0.1  # a model the view lacks: re-read the workers if older than this


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
        self._refresher: asyncio.Task[None] | None = None
        self._queued: dict[str, int] = {}  # model -> its stream's length, read with the workers

    def start(self) -> None:
        """Keep the view fresh from a background task (in the gateway's lifespan)."""
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def live_workers(self, max_age_s: float | None = None) -> list[WorkerStatus]:
        """Workers whose heartbeat key has not expired, as read at most `max_age_s` ago (by
        default the view's own limit: see the module's docstring)."""
        limit = self._staleness(self._workers_ttl_s) if max_age_s is None else max_age_s
        if time.monotonic() - self._workers_read_at < limit:
            return self._workers
        return await self._read_workers()

    async def served_models(self, max_age_s: float | None = None) -> list[str]:
        return _models_of(await self.live_workers(max_age_s))

    async def get(self, name: str) -> ServedModel:
        """The served model called `name`: 503 if no worker is alive, 404 if none serves it."""
        served = await self.served_models()
        if name not in served:  # perhaps a worker that started since the last refresh
            served = await self.served_models(MISSING_MODEL_REREAD_S)
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

    async def default_model(self, max_age_s: float | None = None) -> ServedModel:
        """The first served model by name: what TGI routes without a model field describe."""
        served = await self.served_models(max_age_s)
        if not served:
            served = await self.served_models(MISSING_MODEL_REREAD_S)
        if not served:
            await self.get("")  # raises the 503
        return await self._load(served[0])

    def queued(self, name: str) -> int | None:
        """The length of the model's request stream as last refreshed; None when unknown or
        older than the view's limit (the admission check then leaves it to the enqueue)."""
        if time.monotonic() - self._workers_read_at >= self._staleness(self._workers_ttl_s):
            return None
        return self._queued.get(name)

    def _staleness(self, period_s: float) -> float:
        """How old a part of the view may be before a request re-reads it."""
        refreshing = self._refresher is not None and not self._refresher.done()
        return period_s * STALE_PERIODS if refreshing else period_s

    async def _read_workers(self) -> list[WorkerStatus]:
        names = [
            name
            async for name in self._redis.scan_iter(match=self._keys.worker_pattern(), count=1000)
        ]
        values = await self._redis.mget(names) if names else []
        statuses = [WorkerStatus.from_json(raw) for raw in values if raw is not None]
        self._workers = [status for status in statuses if status is not None]
        self._workers_read_at = time.monotonic()
        return self._workers

    async def _refresh_forever(self) -> None:
        """Re-read the workers every `workers_ttl_s` and re-check the loaded models' hashes
        every `refresh_s`; a failure is logged once and retried at the next period."""
        failing = False
        while True:
            try:
                served = _models_of(await self._read_workers())
                await self._read_queue_lengths(served)
                for name, entry in list(self._cache.items()):
                    if name in served and time.monotonic() - entry.checked_at >= self._refresh_s:
                        await self._check(name, entry)
                if failing:
                    logger.info("registry: Redis answers again")
                failing = False
            except Exception as err:  # the task must outlive any one failure
                if not failing:
                    expected = isinstance(err, RedisError | OSError | ApiError)
                    logger.warning("registry: refreshing failed: %s", err, exc_info=not expected)
                failing = True
            await asyncio.sleep(self._workers_ttl_s)

    async def _read_queue_lengths(self, models: list[str]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for name in models:
            pipe.xlen(self._keys.requests(name))
        self._queued = dict(zip(models, await pipe.execute(), strict=True))

    async def _load(self, name: str) -> ServedModel:
        entry = self._cache.get(name)
        if entry is not None and time.monotonic() - entry.checked_at < self._staleness(
            self._refresh_s
        ):
            return entry.model
        return await self._check(name, entry)

    async def _check(self, name: str, entry: _CacheEntry | None) -> ServedModel:
        """The model as its hash is now: the cached one if the fingerprint did not change."""
        now = time.monotonic()
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


def _models_of(workers: list[WorkerStatus]) -> list[str]:
    """The models these workers serve, each once, by name."""
    return sorted({worker.model for worker in workers})
