"""Tokenizer and chat-template helpers shared by the gateway and the worker.

A worker publishes what clients need to know about its model as the Redis hash
`spindle:model:{model}` (see DESIGN.md); `ModelCard` is that hash as a typed object, with one
`to_hash` / `from_hash` pair. `build_tokenizer` rebuilds a fast tokenizer from the card alone (no
model files), and `render_chat` applies the model's chat template, so the gateway needs neither
the model folder nor the Hub.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from common.model_files import eos_token_ids as model_eos_token_ids

# tokenizer_config.json keys that describe how the file was saved rather than the tokenizer;
# PreTrainedTokenizerFast rejects some of them as keyword arguments.
_LOADER_ONLY_KEYS = frozenset(
    {
        "added_tokens_decoder",
        "auto_map",
        "backend",
        "is_local",
        "local_files_only",
        "name_or_path",
        "processor_class",
        "tokenizer_class",
        "tokenizer_file",
    }
)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered: no template, or the template rejected them."""


@dataclass(frozen=True)
class ModelCard:
    """What a worker tells gateways about the model it serves (the `spindle:model:{model}` hash).

    The JSON files are kept as text so the gateway rebuilds exactly what the worker loaded."""

    name: str
    tokenizer_json: str  # text of tokenizer.json
    max_input_tokens: int
    max_total_tokens: int
    tokenizer_config_json: str = "{}"  # text of tokenizer_config.json
    chat_template: str = ""  # text of chat_template.jinja; "" = use tokenizer_config's
    generation_config_json: str = ""  # text of generation_config.json; "" = none
    eos_token_ids: tuple[int, ...] = ()

    @property
    def tokenizer_config(self) -> dict[str, Any]:
        return json.loads(self.tokenizer_config_json or "{}")

    @property
    def generation_config(self) -> dict[str, Any]:
        return json.loads(self.generation_config_json or "{}")

    def template(self) -> str | None:
        """The chat template: chat_template.jinja, else tokenizer_config's (a string, or a list
        of named templates of which "default" is used)."""
        if self.chat_template.strip():
            return self.chat_template
        configured = self.tokenizer_config.get("chat_template")
        if isinstance(configured, list):
            named = {entry.get("name"): entry.get("template") for entry in configured}
            configured = named.get("default")
        return configured or None

    def to_hash(self) -> dict[str, str]:
        return {
            "tokenizer_json": self.tokenizer_json,
            "tokenizer_config_json": self.tokenizer_config_json,
            "chat_template": self.chat_template,
            "generation_config_json": self.generation_config_json,
            "max_input_tokens": str(self.max_input_tokens),
            "max_total_tokens": str(self.max_total_tokens),
            "eos_token_ids": json.dumps(list(self.eos_token_ids)),
        }

    @classmethod
    def from_hash(cls, name: str, fields: Mapping[Any, Any]) -> ModelCard:
        """Decode the hash as redis returns it (bytes or str keys and values)."""
        text = {_text(key): _text(value) for key, value in fields.items()}
        missing = [
            key
            for key in ("tokenizer_json", "max_input_tokens", "max_total_tokens")
            if not text.get(key)
        ]
        if missing:
            raise ValueError(f"model hash for {name!r} lacks {', '.join(missing)}")
        return cls(
            name=name,
            tokenizer_json=text["tokenizer_json"],
            max_input_tokens=int(text["max_input_tokens"]),
            max_total_tokens=int(text["max_total_tokens"]),
            tokenizer_config_json=text.get("tokenizer_config_json") or "{}",
            chat_template=text.get("chat_template", ""),
            generation_config_json=text.get("generation_config_json", ""),
            eos_token_ids=tuple(json.loads(text.get("eos_token_ids") or "[]")),
        )

    @classmethod
    def from_folder(
        cls,
        name: str,
        folder: str | Path,
        *,
        max_input_tokens: int,
        max_total_tokens: int,
        eos_token_ids: Sequence[int] | None = None,
    ) -> ModelCard:
        """Read a Hugging Face model folder's tokenizer files. Without `eos_token_ids`, they are the
        folder's (`common.model_files.eos_token_ids`)."""
        folder = Path(folder)

        def read(filename: str) -> str:
            path = folder / filename
            return path.read_text(encoding="utf-8") if path.is_file() else ""

        generation_config = read("generation_config.json")
        if eos_token_ids is None:
            eos_token_ids = model_eos_token_ids(folder)
        return cls(
            name=name,
            tokenizer_json=read("tokenizer.json"),
            max_input_tokens=max_input_tokens,
            max_total_tokens=max_total_tokens,
            tokenizer_config_json=read("tokenizer_config.json") or "{}",
            chat_template=read("chat_template.jinja"),
            generation_config_json=generation_config,
            eos_token_ids=tuple(eos_token_ids),
        )


def build_tokenizer(card: ModelCard) -> PreTrainedTokenizerFast:
    """A fast tokenizer from the card's tokenizer.json and tokenizer_config.json, with the chat
    template attached. Takes ~0.25 s for a 49k vocabulary: callers on an event loop should run
    it in a thread."""
    config = {
        key: _plain_token(value)
        for key, value in card.tokenizer_config.items()
        if key not in _LOADER_ONLY_KEYS
    }
    config["chat_template"] = card.template()
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(card.tokenizer_json), **config
    )


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> frozenset[int]:
    """Ids of every special token: the named ones (bos, eos...) and added tokens marked special."""
    added = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return frozenset(added | set(tokenizer.all_special_ids))


def render_chat(tokenizer: PreTrainedTokenizerFast, messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt text for a conversation, ending with the assistant's turn opener."""
    if not tokenizer.chat_template:
        raise ChatTemplateError(
            "this model has no chat template; send a plain prompt to /v1/completions instead"
        )
    try:
        rendered = tokenizer.apply_chat_template(
            [dict(message) for message in messages], add_generation_prompt=True, tokenize=False
        )
    except (jinja2.TemplateError, TypeError) as err:
        raise ChatTemplateError(f"the chat template rejected these messages: {err}") from err
    return str(rendered)


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerFast, messages: Sequence[Mapping[str, Any]]
) -> list[int]:
    """Token ids of the rendered conversation. The template already writes any BOS token, so
    no special tokens are added on top (as transformers does with tokenize=True)."""
    return tokenizer.encode(render_chat(tokenizer, messages), add_special_tokens=False)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _plain_token(value: Any) -> Any:
    """Saved configs may spell a special token as {"content": ..., "__type": "AddedToken"}."""
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    if isinstance(value, list):
        return [_plain_token(item) for item in value]
    return value
