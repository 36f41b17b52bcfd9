"""A deterministic stand-in for the worker, speaking the real Redis contract (DESIGN.md), so the
gateway can be tested without a model.

It registers a tiny word-level model (`tiny_model_card`), heartbeats, reads jobs with XREADGROUP
and answers each with one event per token: the prompt's non-special tokens reversed (choice `i`
rotated by `i`), then the end-of-sequence token, unless `ignore_eos` (then it cycles). It honours
max_new_tokens, n, stop strings, stop_token_ids, logprobs and cancellation (`spindle:cancel` and
`spindle:cancelled:{id}`), and XACKs + XDELs each finished job. Two words in a prompt change its
behaviour: "slow" makes each token take 0.1 s, "fail" makes the job fail after one token.

Use it as an asyncio task (`await FakeWorker(...).run()`) or as a process:
`python -m tests.integration.fake_worker --redis-url URL --prefix P --model NAME`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

from common.chat import ModelCard
from common.keys import WORKER_GROUP, Keys
from common.protocol import ErrorInfo, Event, Job, TokenLogprob, Usage

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "hello",
    "world",
    "what",
    "is",
    "capital",
    "of",
    "france",
    "paris",
    "system",
    "user",
    "assistant",
    "tool",
    "you",
    "are",
    "helpful",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "stop",
    "here",
    "blue",
    "red",
    "green",
    "slow",
    "fail",
    ".",
    ",",
    "?",
    "!",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
EOS_ID = SPECIAL_TOKENS.index("</s>")
SLOW_TOKEN_DELAY_S = 0.1


def tiny_model_card(
    name: str = "tiny", max_input_tokens: int = 64, max_total_tokens: int = 96
) -> ModelCard:
    """A word-level tokenizer (specials first, then WORDS) that prepends <s> like a Llama one,
    with a ChatML-like template in its tokenizer_config."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return ModelCard(
        name=name,
        tokenizer_json=tokenizer.to_str(),
        max_input_tokens=max_input_tokens,
        max_total_tokens=max_total_tokens,
        tokenizer_config_json=json.dumps(config),
        generation_config_json=json.dumps({"eos_token_id": EOS_ID}),
        eos_token_ids=(EOS_ID,),
    )


def expected_token_ids(
    prompt_ids: list[int], max_new_tokens: int, index: int = 0, ignore_eos: bool = False
) -> list[int]:
    """What the fake worker generates for a prompt (choice `index`), for tests to compare."""
    content = [token for token in reversed(prompt_ids) if token >= len(SPECIAL_TOKENS)]
    content = content[index % len(content) :] + content[: index % len(content)] if content else []
    if ignore_eos and content:
        cycle = content * (max_new_tokens // len(content) + 1)
        return cycle[:max_new_tokens]
    return (content + [EOS_ID])[:max_new_tokens]


class FakeWorker:
    def __init__(
        self,
        redis_url: str,
        *,
        prefix: str = "spindle",
        card: ModelCard | None = None,
        worker_id: str | None = None,
        heartbeat_ttl_s: float = 3.0,
        consume: bool = True,
    ) -> None:
        self.redis = Redis.from_url(redis_url)
        self.keys = Keys(prefix)
        self.card = card or tiny_model_card()
        self.worker_id = worker_id or f"fake-{uuid.uuid4().hex[:8]}"
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.consume = consume
        self.cancelled: set[str] = set()  # ids this worker saw cancelled, for tests
        self.jobs_seen: list[Job] = []
        self._tokenizer = Tokenizer.from_str(self.card.tokenizer_json)
        self._serving: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Register, then heartbeat and serve until cancelled; removes its heartbeat on the way out."""
        await self.redis.hset(self.keys.model(self.card.name), mapping=self.card.to_hash())
        await self._heartbeat()
        tasks = [asyncio.create_task(self._heartbeat_loop())]
        if self.consume:
            tasks += [
                asyncio.create_task(self._cancel_listener()),
                asyncio.create_task(self._job_loop()),
            ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in [*tasks, *self._serving]:
                task.cancel()
            await asyncio.gather(*tasks, *self._serving, return_exceptions=True)
            with contextlib.suppress(RedisError, OSError):
                await self.redis.delete(self.keys.worker(self.worker_id))
            await self.redis.aclose()

    async def _heartbeat(self) -> None:
        status = {
            "id": self.worker_id,
            "model": self.card.name,
            "device": "cpu",
            "dtype": "float32",
            "shards": 1,
            "running": 0,
            "waiting": 0,
            "kv_used_blocks": 0,
            "kv_total_blocks": 8,
            "version": "fake",
            "heartbeat": time.time(),
        }
        await self.redis.set(
            self.keys.worker(self.worker_id),
            json.dumps(status),
            px=int(self.heartbeat_ttl_s * 1000),
        )

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_ttl_s / 3)
            await self._heartbeat()

    async def _cancel_listener(self) -> None:
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(self.keys.cancel)
        async for message in pubsub.listen():
            if message["type"] == "message":
                self.cancelled.add(message["data"].decode())

    async def _job_loop(self) -> None:
        stream = self.keys.requests(self.card.name)
        with contextlib.suppress(ResponseError):  # BUSYGROUP: another worker made it
            await self.redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
        while True:
            batches = await self.redis.xreadgroup(
                WORKER_GROUP, self.worker_id, {stream: ">"}, count=8, block=200
            )
            for _, entries in batches or []:
                for entry_id, fields in entries:
                    job = Job.from_json(fields[b"job"])
                    self.jobs_seen.append(job)
                    task = asyncio.create_task(self._serve(stream, entry_id, job))
                    self._serving.add(task)
                    task.add_done_callback(self._serving.discard)

    async def _serve(self, stream: str, entry_id: bytes, job: Job) -> None:
        try:
            if await self.redis.exists(self.keys.cancelled(job.id)):
                self.cancelled.add(job.id)
            await self._generate(job)
        finally:
            await self.redis.xack(stream, WORKER_GROUP, entry_id)
            await self.redis.xdel(stream, entry_id)

    async def _generate(self, job: Job) -> None:
        words = set(self._tokenizer.decode(job.prompt_ids).split())
        delay = SLOW_TOKEN_DELAY_S if "slow" in words else 0.0
        publisher = _Publisher(self.redis, self.keys.events(job.id), job.id, self.worker_id)
        choices = [_Choice(index, job, self._tokenizer) for index in range(job.sampling.n)]
        while any(not choice.finished for choice in choices):
            if job.id in self.cancelled:
                await publisher.send(
                    finish="cancelled", error=ErrorInfo("cancelled by the client", "cancelled")
                )
                return
            for choice in choices:
                if choice.finished:
                    continue
                event_fields = choice.step()
                if all(c.finished for c in choices):
                    completion = sum(len(c.generated) for c in choices)
                    event_fields["usage"] = Usage(len(job.prompt_ids), completion)
                await publisher.send(**event_fields)
                if "fail" in words:
                    error = ErrorInfo("fake failure: the prompt asked for it", "internal_error")
                    await publisher.send(finish="error", error=error)
                    return
            await asyncio.sleep(delay)


class _Publisher:
    def __init__(self, redis: Redis, channel: str, job_id: str, worker_id: str) -> None:
        self.redis, self.channel, self.job_id, self.worker_id = redis, channel, job_id, worker_id
        self.seq = 0

    async def send(self, **fields: object) -> None:
        event = Event(id=self.job_id, seq=self.seq, worker=self.worker_id, **fields)  # type: ignore[arg-type]
        self.seq += 1
        await self.redis.publish(self.channel, event.to_json())


class _Choice:
    """One choice's progress: which token comes next, the text so far, whether it finished."""

    def __init__(self, index: int, job: Job, tokenizer: Tokenizer) -> None:
        self.index, self.job, self.tokenizer = index, job, tokenizer
        self.plan = expected_token_ids(job.prompt_ids, job.max_new_tokens, index, job.ignore_eos)
        self.generated: list[int] = []
        self.text = ""
        self.finished = False

    def step(self) -> dict[str, object]:
        token = self.plan[len(self.generated)]
        self.generated.append(token)
        sent = len(self.text)
        self.text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        delta = self.text[sent:]
        finish = self._finish(token)
        for stop in self.job.stop:
            if stop in self.text:
                delta = self.text[sent : max(sent, self.text.index(stop))]
                finish = "stop"
        self.finished = finish is not None
        logprobs = None
        if self.job.logprobs is not None:
            top = [(token, -0.5), ((token + 1) % self.tokenizer.get_vocab_size(), -1.5)]
            logprobs = [TokenLogprob(token, -0.5, top[: self.job.logprobs])]
        return {
            "index": self.index,
            "token_ids": [token],
            "text": delta,
            "logprobs": logprobs,
            "finish": finish,
        }

    def _finish(self, token: int) -> str | None:
        if token in self.job.stop_token_ids:
            return "stop"
        if token == EOS_ID and not self.job.ignore_eos:
            return "eos_token"
        if len(self.generated) >= self.job.max_new_tokens or len(self.generated) >= len(self.plan):
            return "length"
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description="a fake spindle worker for tests")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", default="spindle")
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    worker = FakeWorker(args.redis_url, prefix=args.prefix, card=tiny_model_card(args.model))
    print(f"fake worker {worker.worker_id} serving {args.model}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(worker.run())


if __name__ == "__main__":
    main()
