"""The worker's side of the Redis contract (DESIGN.md): pull jobs from the model's stream as a
member of group `workers`, publish every request's events of a step in one round trip (which also
asks for more jobs while the worker is busy), keep resume progress, register the model,
heartbeat, and claim the jobs of workers whose heartbeat expired. Synchronous redis-py: the
worker loop is one thread, its publishes one background thread, and a step's I/O is one round
trip."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis

from common.chat import ModelCard
from common.keys import WORKER_GROUP, Keys
from common.protocol import ErrorInfo, Event, Job, ProtocolError

log = logging.getLogger(__name__)

PROGRESS_TTL_S = 3600  # a progress list outlives its job by this much at least


Command = tuple[bytes | str | int, ...]


@dataclass
class Delivery:
    """A job taken from the stream: `message_id` is what XACK/XDEL need; `deliveries` counts how
    often the stream has handed it out (1 unless claimed from a dead worker)."""

    message_id: str
    job: Job
    deliveries: int = 1


@dataclass
class StepReply:
    """What one `publish` brought back: per request, the listener count of its last PUBLISH,
    and the jobs its pull took."""

    listeners: dict[str, int]
    pulled: list[Delivery]


class Sent:
    """Commands sent on a connection taken from the pool; `replies()` reads their replies, in
    order, and gives the connection back (dropped instead after an error reply or a failure)."""

    def __init__(self, pool: Any, connection: Any, count: int) -> None:
        self._pool, self._connection, self._count = pool, connection, count

    def replies(self) -> list[Any]:
        connection, self._connection = self._connection, None
        if connection is None:
            raise RuntimeError("the replies were read already")
        try:
            return [connection.read_response() for _ in range(self._count)]
        except BaseException:
            connection.disconnect()
            raise
        finally:
            self._pool.release(connection)


@dataclass
class CancelledCheck:
    """`JobQueue.check_cancelled`'s question on its way; `answer()` waits for the reply."""

    request_ids: list[str]
    sent: Sent | None

    def answer(self) -> set[str]:
        """The ids among `request_ids` that a gateway cancelled."""
        if self.sent is None:
            return set()
        found = self.sent.replies()
        return {rid for rid, exists in zip(self.request_ids, found, strict=True) if exists}


class JobQueue:
    def __init__(self, client: redis.Redis, keys: Keys, model: str, worker_id: str):
        # redis-py types its sync client as maybe-awaitable; this worker only uses it synchronously.
        self.client: Any = client
        self.keys = keys
        self.model = model
        self.worker_id = worker_id
        self.stream = keys.requests(model)
        self._cancels = client.pubsub(ignore_subscribe_messages=True)
        self._cancels.subscribe(keys.cancel)
        self._progress_ttl_set: dict[str, float] = {}  # request id -> when its TTL was last set
        self._ensure_group()

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, WORKER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    # -- registration and liveness -----------------------------------------------------------

    def register(self, card: ModelCard) -> None:
        self.client.hset(self.keys.model(self.model), mapping=card.to_hash())

    def heartbeat(self, status: dict, ttl_s: float) -> None:
        payload = {"id": self.worker_id, "model": self.model, "heartbeat": time.time(), **status}
        self.client.set(self.keys.worker(self.worker_id), json.dumps(payload), px=int(ttl_s * 1000))

    def unregister(self) -> None:
        self.client.delete(self.keys.worker(self.worker_id))

    def is_alive(self, worker_id: str) -> bool:
        return bool(self.client.exists(self.keys.worker(worker_id)))

    # -- taking work --------------------------------------------------------------------------

    def pull(self, count: int, block_ms: int | None) -> list[Delivery]:
        """Up to `count` new jobs; blocks up to `block_ms` when none is queued (None = no wait)."""
        block = () if block_ms is None else (b"BLOCK", block_ms)
        [reply] = self._execute([self._read_new(count, *block)])
        return self._pulled(reply)

    def claim_orphans(self, min_idle_ms: int, count: int) -> list[Delivery]:
        """Jobs delivered to workers whose heartbeat has expired, now claimed by this worker."""
        pending = self.client.xpending_range(
            self.stream, WORKER_GROUP, min="-", max="+", count=100, idle=min_idle_ms
        )
        dead_owners = {
            entry["consumer"] for entry in pending if entry["consumer"] != self.worker_id
        }
        dead_owners = {owner for owner in dead_owners if not self.is_alive(_text(owner))}
        orphans = [entry for entry in pending if entry["consumer"] in dead_owners][:count]
        claimed = []
        for entry in orphans:
            reply = self.client.xclaim(
                self.stream, WORKER_GROUP, self.worker_id, min_idle_ms, [entry["message_id"]]
            )
            for message_id, fields in reply:
                if fields is None:
                    continue
                delivery = self._decode(message_id, fields, entry["times_delivered"] + 1)
                if delivery is not None:
                    claimed.append(delivery)
        return claimed

    def _decode(self, message_id, fields, deliveries: int = 1) -> Delivery | None:
        message_id = _text(message_id)
        raw = fields.get(b"job") or fields.get("job")
        try:
            return Delivery(message_id, Job.from_json(raw or b""), deliveries)
        except ProtocolError as err:
            log.error("dropping malformed job %s: %s", message_id, err)
            self.client.xadd(
                self.keys.dead(self.model), {"message_id": message_id, "error": str(err)}
            )
            self.acknowledge(message_id)
            return None

    def acknowledge(self, message_id: str) -> None:
        self.client.pipeline(transaction=False).xack(self.stream, WORKER_GROUP, message_id).xdel(
            self.stream, message_id
        ).execute()

    def progress(self, request_id: str) -> list[int]:
        return [int(token) for token in self.client.lrange(self.keys.progress(request_id), 0, -1)]

    def dead_letter(self, delivery: Delivery, error: ErrorInfo) -> None:
        self.client.xadd(
            self.keys.dead(self.model),
            {
                "message_id": delivery.message_id,
                "job": delivery.job.to_json(),
                "error": error.message,
                "worker": self.worker_id,
            },
        )

    # -- cancellation -------------------------------------------------------------------------

    def poll_cancels(self) -> list[str]:
        ids = []
        while (message := self._cancels.get_message(timeout=0)) is not None:
            ids.append(_text(message["data"]))
        return ids

    def cancelled(self, request_ids: list[str]) -> set[str]:
        """Which of these requests a gateway cancelled before a worker picked them up."""
        return self.check_cancelled(request_ids).answer()

    def check_cancelled(self, request_ids: list[str]) -> CancelledCheck:
        """`cancelled` in two halves: the question is sent now, and `answer()` reads the reply,
        so the caller can work while it travels (an idle worker prefills a fresh job meanwhile)."""
        if not request_ids:
            return CancelledCheck([], None)
        sent = self._send([(b"EXISTS", self.keys.cancelled(rid)) for rid in request_ids])
        return CancelledCheck(request_ids, sent)

    # -- the step's output --------------------------------------------------------------------

    def publish(self, events: list[Event], finished: dict[str, str], pull: int = 0) -> StepReply:
        """Send a step's events in one round trip; record resume progress; XACK + XDEL the jobs
        that ended (`finished`: request id -> message id); with `pull` > 0, take up to that many
        new jobs in the same round trip (XREADGROUP without blocking), so a busy worker asks for
        work without a round trip of its own."""
        commands: list[Command] = []
        publish_reply: dict[str, int] = {}  # request id -> index of its last PUBLISH's reply
        now = time.monotonic()
        for event in events:
            publish_reply[event.id] = len(commands)
            commands.append((b"PUBLISH", self.keys.events(event.id), event.to_json()))
            if event.token_ids and event.usage is None:
                commands.append((b"RPUSH", self.keys.progress(event.id), *event.token_ids))
                self._refresh_progress_ttl(commands, event.id, now)
        for request_id, message_id in finished.items():
            commands.append((b"XACK", self.stream, WORKER_GROUP, message_id))
            commands.append((b"XDEL", self.stream, message_id))
            commands.append((b"DEL", self.keys.progress(request_id)))
            self._progress_ttl_set.pop(request_id, None)
        if pull > 0:
            commands.append(self._read_new(pull))
        replies = self._execute(commands)
        return StepReply(
            listeners={request_id: replies[index] for request_id, index in publish_reply.items()},
            pulled=self._pulled(replies[-1]) if pull > 0 else [],
        )

    def _refresh_progress_ttl(self, commands: list[Command], request_id: str, now: float) -> None:
        """EXPIRE a job's progress list on its first tokens and then every half TTL, not with
        every token: a third of a step's commands otherwise."""
        last = self._progress_ttl_set.get(request_id)
        if last is None or now - last > PROGRESS_TTL_S / 2:
            commands.append((b"EXPIRE", self.keys.progress(request_id), PROGRESS_TTL_S))
            self._progress_ttl_set[request_id] = now

    def _execute(self, commands: list[Command]) -> list[Any]:
        """Send `commands` in one write and read their replies, in order: redis-py's pipeline
        without its per-command bookkeeping, which cost ~6 us a command (a step of 32 events,
        0.55 -> 0.2 ms of CPU, in the publisher thread that shares the GIL with the engine's).
        An error reply is raised, and the connection dropped with the rest unread."""
        return self._send(commands).replies()

    def _send(self, commands: list[Command]) -> Sent:
        """Send `commands` in one write; their replies are read by `Sent.replies()`."""
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([b"".join(map(_pack, commands))])
        except BaseException:
            connection.disconnect()
            pool.release(connection)
            raise
        return Sent(pool, connection, len(commands))

    def _read_new(self, count: int, *options: bytes | int) -> Command:
        """XREADGROUP of up to `count` jobs never delivered to any worker."""
        return (b"XREADGROUP", b"GROUP", WORKER_GROUP, self.worker_id, b"COUNT", count, *options,
                b"STREAMS", self.stream, b">")  # fmt: skip

    def _pulled(self, reply: list | None) -> list[Delivery]:
        """The deliveries in a raw XREADGROUP reply: [[stream, [[id, [field, value, ...]]]]]."""
        deliveries = []
        for _stream, messages in reply or []:
            for message_id, flat in messages:
                delivery = self._decode(message_id, dict(zip(flat[::2], flat[1::2], strict=True)))
                if delivery is not None:
                    deliveries.append(delivery)
        return deliveries

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self._cancels.close()


def _pack(command: Command) -> bytes:
    """One command in RESP, the protocol's request format: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
