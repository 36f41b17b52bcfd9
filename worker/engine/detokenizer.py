"""Incremental detokenisation of one generated sequence, with stop strings.

The engine keeps one `IncrementalDetokenizer` per sequence and pushes each sampled token id; the
text deltas it returns go straight to clients, so they never split a UTF-8 character, skip special
tokens unless asked, and never contain text that may still turn out to be part of a stop string.

Decoding uses the prefix/read-offset method of vLLM and TGI: only a small window of token ids is
kept, `window[:read]` (the last chunk already emitted, kept as context) and `window[read:]` (new
tokens). Each push decodes the window and emits what it adds to the context's text, unless that
ends in U+FFFD (a character whose remaining bytes are still to come). The context matters: it
makes the leading space of a SentencePiece "▁word" token come out as it does in a full decode of
prompt + output, and it starts out as the prompt's last few tokens. `tokenizers.decoders.DecodeStream`
does the same buffering, but it cannot flush an incomplete tail at the end of a sequence nor bound
its window, hence this class.

Decisions a caller may rely on:
* The concatenation of all deltas and `flush()` equals the text the same tokens have in a full
  decode of prompt + output (for byte-level BPE that is also `tokenizer.decode(output_ids)`).
  A SentencePiece "▁word" first token therefore starts with a space, as in vLLM and TGI.
* Stop strings end the text at the match that *completes* first, as if the text were scanned one
  character at a time (ties: the one that starts earlier), so the result does not depend on how
  the text was split into tokens. Empty stop strings are ignored.
* At most `MAX_HELD_TOKENS` tokens wait for a character to complete; past that (only a model
  producing invalid UTF-8 gets there) the U+FFFD text is sent, which keeps the work per token
  bounded.
* `initial_output_ids` (tokens sent before a resume) are replayed through the same code without
  being emitted, so the text held back at that point (a partial character or a possible stop
  string) comes out exactly as it would have without the interruption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tokenizers

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context for the first generated token (vLLM uses 5 too).
CONTEXT_TOKENS = 5
# How far back the context may reach when the last prompt tokens decode to nothing (special tokens)
# or start in the middle of a character.
MAX_CONTEXT_TOKENS = 32
# A UTF-8 character needs at most 4 byte tokens; beyond this many the text is sent as it is.
MAX_HELD_TOKENS = 16


@dataclass(frozen=True)
class DetokenizerStep:
    """What one pushed token produced."""

    text: str  # new text safe to send now (may be "")
    stopped: bool  # a stop string matched; `text` ends right before it (or includes it if asked)
    stop_string: str | None  # the stop string that matched, when stopped


class StopStringMatcher:
    """Finds stop strings in the text not yet sent and decides how much of it is safe to send.

    The text already sent never ends with a proper prefix of a stop string (that part is held
    back), so a match always starts inside the held-back buffer: each scan looks at a buffer no
    longer than the longest stop string plus the newest delta.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool) -> None:
        self.stop = tuple(dict.fromkeys(s for s in stop if s))
        self.include_stop_str_in_output = include_stop_str_in_output
        self._prefixes = {s[:k] for s in self.stop for k in range(1, len(s))}
        self._longest_prefix = max((len(p) for p in self._prefixes), default=0)

    def scan(self, buffer: str) -> tuple[str, str, str | None]:
        """Split `buffer` into (text to send, text to hold back, matched stop string or None).
        After a match nothing is held back: the text past the stop string is dropped."""
        match = self._first_completed_match(buffer)
        if match is not None:
            start, stop_string = match
            end = start + len(stop_string) if self.include_stop_str_in_output else start
            return buffer[:end], "", stop_string
        held = self._held_suffix_length(buffer)
        return buffer[: len(buffer) - held], buffer[len(buffer) - held :], None

    def _first_completed_match(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop_string in self.stop:
            start = buffer.find(stop_string)
            if start < 0:
                continue
            candidate = (start + len(stop_string), start, stop_string)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _held_suffix_length(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that could still grow into a stop string."""
        for length in range(min(len(buffer), self._longest_prefix), 0, -1):
            if buffer[-length:] in self._prefixes:
                return length
        return 0


class IncrementalDetokenizer:
    """Turns one sequence's token ids into text deltas, one token at a time (see module doc)."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        prompt_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        initial_output_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._skipped_ids = _special_token_ids(tokenizer) if skip_special_tokens else frozenset()
        self._stops = StopStringMatcher(stop, include_stop_str_in_output)
        self._window: list[int] = self._context_ids(prompt_ids)
        self._read = len(self._window)  # window[:read] is context already emitted (or prompt)
        self._read_text = self._decode(self._window)
        self._held = ""  # decoded text held back because it may start a stop string
        self._emitted: list[str] = []
        self._stop_string: str | None = None
        self._finished = False
        for token_id in initial_output_ids:
            self._advance(token_id)  # not push(): that text was sent before the resume

    @property
    def output_text(self) -> str:
        """Everything this detokenizer emitted so far (deltas + flush); text sent before a resume
        (`initial_output_ids`) is not included."""
        return "".join(self._emitted)

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the sequence, if one did."""
        return self._stop_string

    def push(self, token_id: int) -> DetokenizerStep:
        """Add the next generated token; return the text that is now safe to send."""
        step = self._advance(token_id)
        self._emitted.append(step.text)
        return step

    def flush(self) -> str:
        """The sequence ended for another reason (length, eos): return the text held back — a
        partial stop-string prefix, and an incomplete character as a full decode shows it (U+FFFD)."""
        if self._finished:
            return ""
        self._finished = True
        tail = ""
        if len(self._window) > self._read:
            tail = self._decode(self._window)[len(self._read_text) :]
        text, held, stop_string = self._stops.scan(self._held + tail)
        text += held  # nothing follows, so what could have started a stop string did not
        self._held = ""
        self._stop_string = stop_string
        self._emitted.append(text)
        return text

    def _advance(self, token_id: int) -> DetokenizerStep:
        if self._finished:
            return DetokenizerStep("", self._stop_string is not None, self._stop_string)
        text, self._held, stop_string = self._stops.scan(self._held + self._decode_next(token_id))
        if stop_string is not None:
            self._finished = True
            self._stop_string = stop_string
        return DetokenizerStep(text, stop_string is not None, stop_string)

    def _decode_next(self, token_id: int) -> str:
        """The text `token_id` completes, given the tokens before it ("" while a character is
        still incomplete)."""
        if token_id in self._skipped_ids or not self._in_vocab(token_id):
            return ""  # a full decode drops it too (skipped special token, or id past the vocab)
        self._window.append(token_id)
        text = self._decode(self._window)
        waiting = len(self._window) - self._read
        incomplete = text.endswith(REPLACEMENT_CHAR) or len(text) <= len(self._read_text)
        if incomplete and waiting < MAX_HELD_TOKENS:
            return ""
        new_text = text[len(self._read_text) :]
        # The tokens just decoded become the context of the next ones.
        del self._window[: self._read]
        self._read = len(self._window)
        self._read_text = self._decode(self._window)
        return new_text

    def _context_ids(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt's last tokens, reaching further back (bounded) while they decode to nothing
        or start mid-character: the first generated token must be decoded after real text."""
        kept = [t for t in prompt_ids[-MAX_CONTEXT_TOKENS:] if t not in self._skipped_ids]
        start = max(0, len(kept) - CONTEXT_TOKENS)
        while start > 0:
            text = self._decode(kept[start:])
            if text and not text.startswith(REPLACEMENT_CHAR):
                break
            start -= 1
        return kept[start:]

    def _in_vocab(self, token_id: int) -> bool:
        return token_id >= 0 and self._tokenizer.id_to_token(token_id) is not None

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)


def _special_token_ids(tokenizer: tokenizers.Tokenizer) -> frozenset[int]:
    """Ids that `decode(..., skip_special_tokens=True)` drops."""
    return frozenset(
        i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special
    )
