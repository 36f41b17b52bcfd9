"""Benchmark workloads: lists of requests (prompt token ids, max_tokens, arrival time) fixed by a
seed and stored as JSON in bench/workloads/<name>.json, so every system and every run sees exactly
the same work.

Prompts are windows of real English text — the Python reference documentation that ships with
CPython (`pydoc_data.topics`) — tokenized with the model's tokenizer and cut to length at a random
offset. Without a tokenizer, `RandomTokens` draws ids uniformly from the model's vocabulary above
the special/byte tokens. All randomness comes from the workload's seed (see `Draws`), drawn in a fixed
order, so a generator called twice with the same source and seed returns the same workload — and
the workload's shape (lengths, arrival times) depends on the seed alone, not on the tokenizer.

    python -m bench.workloads                      # (re)write the standard workloads
    python -m bench.workloads --model DIR mixed-32 # one workload, another model's tokenizer
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

WORKLOAD_DIR = Path(__file__).parent / "workloads"
# Byte-level BPE vocabularies keep special tokens and single bytes at the bottom; prompts of
# random ids avoid them so they look like ordinary (if meaningless) text to the model.
FIRST_NORMAL_TOKEN_ID = 256


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    max_tokens: int  # output tokens to generate (exactly this many when the workload ignores EOS)
    arrival_s: float = 0.0  # seconds after the start at which it is sent; 0 = all at once


@dataclass(frozen=True)
class Workload:
    name: str
    seed: int
    requests: list[BenchRequest]
    ignore_eos: bool = True
    spec: dict[str, Any] = field(default_factory=dict)  # the generator's parameters
    source: dict[str, Any] = field(default_factory=dict)  # how prompt ids were made

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    def to_json(self) -> str:
        """One request per line: the files stay diffable and small enough to commit."""
        header = {k: v for k, v in asdict(self).items() if k != "requests"}
        lines = [json.dumps(asdict(r), separators=(",", ":")) for r in self.requests]
        body = json.dumps(header, indent=1)[:-2]  # reopen the object to append "requests"
        return body + ',\n "requests": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"

    @classmethod
    def from_json(cls, raw: str) -> Workload:
        data = json.loads(raw)
        requests = [BenchRequest(**r) for r in data.pop("requests")]
        return cls(requests=requests, **data)


# -- where prompt tokens come from ------------------------------------------------------------


class TokenSource(Protocol):
    def take(self, rng: random.Random, length: int) -> list[int]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TextTokens:
    """A long token stream; each prompt is a window of it starting at a random offset."""

    stream: list[int]
    description: dict[str, Any] = field(default_factory=dict)

    def take(self, rng: random.Random, length: int) -> list[int]:
        if length > len(self.stream):
            raise ValueError(
                f"a {length}-token prompt does not fit in the {len(self.stream)}-token text"
            )
        start = rng.randrange(len(self.stream) - length + 1)
        return self.stream[start : start + length]

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "stream_tokens": len(self.stream), **self.description}


@dataclass(frozen=True)
class RandomTokens:
    """Ids drawn uniformly from [low, vocab_size)."""

    vocab_size: int
    low: int = FIRST_NORMAL_TOKEN_ID

    def take(self, rng: random.Random, length: int) -> list[int]:
        return [rng.randrange(self.low, self.vocab_size) for _ in range(length)]

    def describe(self) -> dict[str, Any]:
        return {"kind": "random", "vocab_size": self.vocab_size, "low": self.low}


def python_docs_text() -> str:
    """The Python reference documentation shipped with CPython: ~465k characters of prose."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def text_source(model_dir: Path) -> TextTokens:
    """The docs text tokenized with the tokenizer.json of the model in `model_dir`."""
    from tokenizers import Tokenizer

    tokenizer_path = Path(model_dir) / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json to tokenize prompts with")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    stream = tokenizer.encode(python_docs_text(), add_special_tokens=False).ids
    text = f"pydoc_data.topics (Python {sys.version.split()[0]})"
    return TextTokens(stream, {"text": text, "tokenizer": Path(model_dir).name})


# -- generators -------------------------------------------------------------------------------


class Draws:
    """A workload's randomness. Shape (lengths, arrivals) and prompt tokens come from two
    generators seeded from the one seed: how many numbers a source consumes per prompt then
    cannot shift the lengths drawn after it."""

    def __init__(self, seed: int):
        self.shape = random.Random(seed)
        self.tokens = random.Random(f"tokens-{seed}")

    def request(
        self,
        source: TokenSource,
        prompt_len: tuple[int, int],
        max_tokens: tuple[int, int],
        arrival_s: float = 0.0,
    ) -> BenchRequest:
        length = self.shape.randint(*prompt_len)
        new_tokens = self.shape.randint(*max_tokens)
        return BenchRequest(source.take(self.tokens, length), new_tokens, round(arrival_s, 6))


def mixed(
    source: TokenSource,
    *,
    name: str = "mixed-32",
    count: int = 32,
    prompt_len: tuple[int, int] = (16, 512),
    max_tokens: tuple[int, int] = (16, 256),
    seed: int = 0,
) -> Workload:
    """`count` requests sent at once; prompt and output lengths uniform in the (inclusive) ranges."""
    draws = Draws(seed)
    requests = [draws.request(source, prompt_len, max_tokens) for _ in range(count)]
    spec = {
        "kind": "mixed",
        "count": count,
        "prompt_len": list(prompt_len),
        "max_tokens": list(max_tokens),
    }
    return Workload(name, seed, requests, spec=spec, source=source.describe())


def single(
    source: TokenSource,
    *,
    name: str = "single",
    prompt_len: int = 128,
    max_tokens: int = 128,
    seed: int = 0,
) -> Workload:
    """One request: the latency of a lone sequence, no batching to hide behind."""
    workload = mixed(
        source,
        name=name,
        count=1,
        prompt_len=(prompt_len, prompt_len),
        max_tokens=(max_tokens, max_tokens),
        seed=seed,
    )
    spec = {"kind": "single", "prompt_len": prompt_len, "max_tokens": max_tokens}
    return Workload(name, seed, workload.requests, spec=spec, source=workload.source)


def poisson(
    source: TokenSource,
    *,
    name: str = "poisson",
    rate_per_s: float = 0.5,
    duration_s: float = 60.0,
    prompt_len: tuple[int, int] = (16, 512),
    max_tokens: tuple[int, int] = (16, 256),
    seed: int = 0,
) -> Workload:
    """Requests arriving as a Poisson process of `rate_per_s` for `duration_s` seconds (for a
    server benchmark: the arrival times are part of the workload)."""
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError(f"rate ({rate_per_s}/s) and duration ({duration_s} s) must be positive")
    draws = Draws(seed)
    requests = []
    arrival = draws.shape.expovariate(rate_per_s)
    while arrival < duration_s:
        requests.append(draws.request(source, prompt_len, max_tokens, arrival))
        arrival += draws.shape.expovariate(rate_per_s)
    spec = {
        "kind": "poisson",
        "rate_per_s": rate_per_s,
        "duration_s": duration_s,
        "prompt_len": list(prompt_len),
        "max_tokens": list(max_tokens),
    }
    return Workload(name, seed, requests, spec=spec, source=source.describe())


def shared_prefix(
    source: TokenSource,
    *,
    name: str = "shared-prefix",
    count: int = 16,
    prefix_len: int = 384,
    suffix_len: tuple[int, int] = (16, 64),
    max_tokens: tuple[int, int] = (32, 128),
    seed: int = 0,
) -> Workload:
    """`count` requests that all start with the same `prefix_len` tokens (a long system prompt),
    each followed by its own suffix: what prefix caching saves."""
    draws = Draws(seed)
    prefix = source.take(draws.tokens, prefix_len)
    requests = []
    for _ in range(count):
        own = draws.request(source, suffix_len, max_tokens)
        requests.append(BenchRequest(prefix + own.prompt_ids, own.max_tokens))
    spec = {
        "kind": "shared-prefix",
        "count": count,
        "prefix_len": prefix_len,
        "suffix_len": list(suffix_len),
        "max_tokens": list(max_tokens),
    }
    return Workload(name, seed, requests, spec=spec, source=source.describe())


def single_short(source: TokenSource) -> Workload:
    """One request of 8 prompt tokens and 8 new: the service path's own TTFT, priced against a
    prefill short enough that its swings do not hide a few ms (bench/bar.py)."""
    return single(source, name="single-short", prompt_len=8, max_tokens=8)


STANDARD_WORKLOADS: dict[str, Callable[[TokenSource], Workload]] = {
    "single": single,
    "single-short": single_short,
    "mixed-32": mixed,
    "poisson": poisson,
    "shared-prefix": shared_prefix,
}


# -- files ------------------------------------------------------------------------------------


def workload_path(name: str, directory: Path = WORKLOAD_DIR) -> Path:
    return directory / f"{name}.json"


def save_workload(workload: Workload, directory: Path = WORKLOAD_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = workload_path(workload.name, directory)
    path.write_text(workload.to_json(), encoding="utf-8")
    return path


def load_workload(name_or_path: str | Path, directory: Path = WORKLOAD_DIR) -> Workload:
    """A workload by name (bench/workloads/<name>.json) or by the path of its JSON file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = workload_path(str(name_or_path), directory)
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.json"))
        raise FileNotFoundError(
            f"no workload {name_or_path!r}: not a file, and {directory} has only {known}; "
            "generate it with `python -m bench.workloads`"
        )
    return Workload.from_json(path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the benchmark workloads as JSON files.")
    parser.add_argument(
        "names",
        nargs="*",
        default=list(STANDARD_WORKLOADS),
        help=f"workloads to write, of {list(STANDARD_WORKLOADS)} (default: all)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model folder whose tokenizer cuts the text (default: the demo model)",
    )
    parser.add_argument(
        "--random-tokens",
        type=int,
        metavar="VOCAB_SIZE",
        default=None,
        help="draw random ids below VOCAB_SIZE instead of tokenizing text",
    )
    parser.add_argument("--out-dir", type=Path, default=WORKLOAD_DIR)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(STANDARD_WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {list(STANDARD_WORKLOADS)}")
    source: TokenSource
    if args.random_tokens is not None:
        source = RandomTokens(args.random_tokens)
    else:
        from common.model_files import default_demo_dir

        source = text_source(args.model or default_demo_dir())
    for name in args.names:
        workload = STANDARD_WORKLOADS[name](source)
        path = save_workload(workload, args.out_dir)
        print(
            f"{path}: {len(workload.requests)} requests, {workload.prompt_tokens:,} prompt "
            f"tokens, {workload.output_tokens:,} output tokens"
        )


if __name__ == "__main__":
    main()
