"""IncrementalDetokenizer: streamed text equals a full decode, never splits a character, and
holds back and cuts at stop strings — on a byte-level BPE and a SentencePiece-style byte-fallback
tokenizer that the test trains itself (and on the demo model's tokenizer when SPINDLE_DEMO_MODEL
points at it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from worker.engine.detokenizer import (
    CONTEXT_TOKENS,
    DetokenizerStep,
    IncrementalDetokenizer,
)

FFFD = "\ufffd"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The cat sat on the mat. The dog ate the bone, and the bird sang a song.",
    "Hello world! Hello there, how are you today? I am fine, thank you.",
    "### Answer: the capital of France is Paris. ## Notes # one",
    "Café, naïve, résumé, déjà vu, façade, Ünïcödé and Straße.",
    "你好，世界。今天天气很好。我们去公园吧。",
    "Emoji: 😀 😃 🎉 👍🏽 🚀 and the euro sign € and ™.",
    "def main():\n    print('hello')\n    return 0\n",
]
# Text the property tests draw from: letters, spaces, stop-string material and characters of
# 2, 3 and 4 UTF-8 bytes (some of which the SentencePiece tokenizer only knows as byte tokens).
TEXT_ALPHABET = "abcdeht #!\né€ü你界😀🎉™"


def byte_level_bpe() -> Tokenizer:
    """GPT-2 / Llama-3 / SmolLM style: byte-level BPE, every byte is a token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    return tokenizer


def sentencepiece_byte_fallback() -> Tokenizer:
    """Llama-2 style: Metaspace "▁word" pieces, characters outside the vocab as <0xNN> tokens,
    and a decoder that strips the space of the first piece."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    # Trained without the CJK and emoji lines, so those characters (and €, ™) become byte tokens.
    latin = [line for line in CORPUS if line.isascii() or "é" in line]
    tokenizer.train_from_iterator(latin * 5, trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    first_byte_id = len(vocab)
    vocab.update({f"<0x{b:02X}>": first_byte_id + b for b in range(256)})
    spec["model"]["byte_fallback"] = True
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return tokenizer


BYTE_LEVEL = byte_level_bpe()
SENTENCEPIECE = sentencepiece_byte_fallback()
TOKENIZERS = {"byte_level": BYTE_LEVEL, "sentencepiece": SENTENCEPIECE}
PROPERTY = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def token_id(tokenizer: Tokenizer, token: str) -> int:
    found = tokenizer.token_to_id(token)
    assert found is not None, f"{token!r} is not in the vocabulary"
    return found


def stream(detokenizer: IncrementalDetokenizer, token_ids: Sequence[int]) -> list[DetokenizerStep]:
    return [detokenizer.push(token_id) for token_id in token_ids]


def streamed_text(
    tokenizer: Tokenizer, prompt: Sequence[int], output: Sequence[int], skip: bool = True
) -> tuple[str, list[str]]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    deltas = [step.text for step in stream(detokenizer, output)]
    deltas.append(detokenizer.flush())
    assert detokenizer.output_text == "".join(deltas)
    return "".join(deltas), deltas


def text_in_context(
    tokenizer: Tokenizer, prompt: Sequence[int], output: Sequence[int], skip: bool = True
) -> str:
    """What `output` adds to the prompt in a full decode of prompt + output."""
    full = tokenizer.decode([*prompt, *output], skip_special_tokens=skip)
    before = tokenizer.decode(list(prompt), skip_special_tokens=skip)
    assert full.startswith(before)
    return full[len(before) :]


@st.composite
def token_sequences(draw: st.DrawFn, tokenizer: Tokenizer) -> list[int]:
    """Valid text tokenized in arbitrary pieces (not the canonical tokenization), with special
    tokens in between: multi-byte characters end up split over several byte tokens."""
    found = [tokenizer.token_to_id(s) for s in (*SPECIALS, "<s>", "</s>")]
    special_ids = [i for i in found if i is not None]
    pieces = draw(st.lists(st.text(TEXT_ALPHABET, min_size=1, max_size=8), max_size=6))
    token_ids: list[int] = []
    for piece in pieces:
        if special_ids and draw(st.integers(0, 3)) == 0:
            token_ids.append(draw(st.sampled_from(special_ids)))
        token_ids.extend(ids(tokenizer, piece))
    return token_ids


# --- streamed text equals the full decode -------------------------------------------------------


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("skip", [True, False])
@PROPERTY
@given(data=st.data())
def test_stream_equals_full_decode(name: str, skip: bool, data: st.DataObject) -> None:
    tokenizer = TOKENIZERS[name]
    prompt = data.draw(token_sequences(tokenizer), label="prompt")
    output = data.draw(token_sequences(tokenizer), label="output")
    text, deltas = streamed_text(tokenizer, prompt, output, skip)
    assert text == text_in_context(tokenizer, prompt, output, skip)
    if not prompt:
        assert text == tokenizer.decode(output, skip_special_tokens=skip)
    if FFFD not in text:
        assert all(FFFD not in delta for delta in deltas)


@PROPERTY
@given(prompt=token_sequences(BYTE_LEVEL), output=st.lists(st.integers(0, 520), max_size=40))
def test_byte_level_any_ids_equal_decode_of_output(prompt: list[int], output: list[int]) -> None:
    """Any output ids, invalid UTF-8 and ids past the vocabulary included: after a prompt of
    valid text, byte-level BPE output decodes the same in context and alone, and the stream
    matches it."""
    text, _ = streamed_text(BYTE_LEVEL, prompt, output)
    assert text == BYTE_LEVEL.decode(output, skip_special_tokens=True)


@pytest.fixture(scope="module")
def demo_tokenizer(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(demo_model_dir / "tokenizer.json"))


@PROPERTY
@given(data=st.data())
def test_demo_tokenizer_stream_equals_full_decode(
    demo_tokenizer: Tokenizer, data: st.DataObject
) -> None:
    DEMO = demo_tokenizer
    prompt = data.draw(token_sequences(DEMO), label="prompt")
    output = data.draw(token_sequences(DEMO), label="output")
    text, deltas = streamed_text(DEMO, prompt, output)
    assert text == text_in_context(DEMO, prompt, output) == DEMO.decode(output)
    assert all(FFFD not in delta for delta in deltas)
    random_ids = data.draw(st.lists(st.integers(0, DEMO.get_vocab_size() - 1), max_size=30))
    assert streamed_text(DEMO, prompt, random_ids)[0] == DEMO.decode(random_ids)


def test_multibyte_character_waits_for_its_last_byte_token() -> None:
    euro = ids(SENTENCEPIECE, "a€")[1:]
    assert [SENTENCEPIECE.id_to_token(i) for i in euro] == ["<0xE2>", "<0x82>", "<0xAC>"]
    detokenizer = IncrementalDetokenizer(SENTENCEPIECE, ids(SENTENCEPIECE, "price"))
    deltas = [step.text for step in stream(detokenizer, euro)]
    assert deltas == ["", "", "€"]


def test_flush_shows_an_incomplete_character_as_a_full_decode_does() -> None:
    for tokenizer in TOKENIZERS.values():
        output = ids(tokenizer, "ok 🦀")[:-2]  # drop the crab's last two byte tokens
        detokenizer = IncrementalDetokenizer(tokenizer, [])
        streamed = "".join(step.text for step in stream(detokenizer, output))
        assert streamed.startswith("ok") and FFFD not in streamed
        assert detokenizer.flush().endswith(FFFD)
        assert detokenizer.output_text == tokenizer.decode(output)


def test_first_token_keeps_its_leading_space_after_the_prompt() -> None:
    for tokenizer in TOKENIZERS.values():
        prompt = ids(tokenizer, "Hello")
        word = ids(tokenizer, "Hello world")[len(prompt) :]
        assert IncrementalDetokenizer(tokenizer, prompt).push(word[0]).text.startswith(" w")


def test_prompt_ending_in_special_tokens_still_gives_the_leading_space() -> None:
    """A chat prompt ends with skipped special tokens; the context must reach past them."""
    prompt = ids(SENTENCEPIECE, "the cat") + [token_id(SENTENCEPIECE, "</s>")] * CONTEXT_TOKENS
    word = ids(SENTENCEPIECE, "the cat sat")[len(ids(SENTENCEPIECE, "the cat")) :]
    text, _ = streamed_text(SENTENCEPIECE, prompt, word)
    assert text == " sat" == text_in_context(SENTENCEPIECE, prompt, word)


def test_special_tokens_skipped_or_kept() -> None:
    end = token_id(BYTE_LEVEL, "<|im_end|>")
    output = [*ids(BYTE_LEVEL, "Hi"), end, *ids(BYTE_LEVEL, " there")]
    assert streamed_text(BYTE_LEVEL, [], output, skip=True)[0] == "Hi there"
    assert streamed_text(BYTE_LEVEL, [], output, skip=False)[0] == "Hi<|im_end|> there"


# --- stop strings --------------------------------------------------------------------------------


def push_pieces(
    detokenizer: IncrementalDetokenizer, tokenizer: Tokenizer, pieces: list[str]
) -> tuple[list[str], DetokenizerStep | None]:
    """Push each piece's tokens; return (text of each piece's steps, last step)."""
    texts: list[str] = []
    step = None
    for piece in pieces:
        steps = stream(detokenizer, ids(tokenizer, piece))
        texts.append("".join(s.text for s in steps))
        step = steps[-1]
    return texts, step


def test_stop_string_split_across_tokens_is_held_back_then_cut() -> None:
    assert len(ids(BYTE_LEVEL, "#")) == 1 and len(ids(BYTE_LEVEL, "##")) == 1
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["###"])
    texts, step = push_pieces(detokenizer, BYTE_LEVEL, ["Hello", "#", "##", " after"])
    assert texts == ["Hello", "", "", ""]  # "#" could start "###"; nothing after the stop
    assert step is not None and step.stopped and step.stop_string == "###"
    assert detokenizer.output_text == "Hello"
    assert detokenizer.flush() == ""


def test_held_back_prefix_is_released_when_the_stop_string_does_not_follow() -> None:
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["###"])
    texts, step = push_pieces(detokenizer, BYTE_LEVEL, ["a", "#", "b", "##"])
    assert texts == ["a", "", "#b", ""]
    assert step is not None and not step.stopped
    assert detokenizer.flush() == "##"  # ended for another reason: the held text is sent
    assert detokenizer.output_text == "a#b##"


def test_stop_string_at_the_very_start() -> None:
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, ids(BYTE_LEVEL, "Q"), stop=["###"])
    _, step = push_pieces(detokenizer, BYTE_LEVEL, ["###"])
    assert step == DetokenizerStep("", True, "###")
    assert detokenizer.output_text == ""


def test_stop_strings_with_overlapping_prefixes() -> None:
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["###", "#!"])
    texts, step = push_pieces(detokenizer, BYTE_LEVEL, ["a#", "#", "!"])
    assert texts == ["a", "", "#"]  # "##" could be "###"; "##!" ends with "#!"
    assert step is not None and step.stop_string == "#!"
    assert detokenizer.output_text == "a#"


def test_the_stop_string_completed_first_wins_even_inside_one_token() -> None:
    assert len(ids(BYTE_LEVEL, "###")) == 1
    detokenizer = IncrementalDetokenizer(
        BYTE_LEVEL, [], stop=["###", "##"], include_stop_str_in_output=True
    )
    _, step = push_pieces(detokenizer, BYTE_LEVEL, ["a", "###"])
    assert step == DetokenizerStep("##", True, "##")  # "##" is complete one character earlier
    assert detokenizer.output_text == "a##"


def test_include_stop_str_in_output() -> None:
    detokenizer = IncrementalDetokenizer(
        BYTE_LEVEL, [], stop=["###"], include_stop_str_in_output=True
    )
    texts, step = push_pieces(detokenizer, BYTE_LEVEL, ["Hello", "#", "##", "more"])
    assert texts == ["Hello", "", "###", ""]
    assert step is not None and step.stopped
    assert detokenizer.output_text == "Hello###"


def test_stop_string_made_of_byte_tokens() -> None:
    detokenizer = IncrementalDetokenizer(SENTENCEPIECE, ids(SENTENCEPIECE, "cost"), stop=["€"])
    euro = ids(SENTENCEPIECE, "€")[-3:]
    assert [SENTENCEPIECE.id_to_token(i) for i in euro] == ["<0xE2>", "<0x82>", "<0xAC>"]
    five = ids(SENTENCEPIECE, "cost 5")[len(ids(SENTENCEPIECE, "cost")) :]
    steps = stream(detokenizer, [*five, *euro])
    assert [step.stopped for step in steps[-3:]] == [False, False, True]
    assert steps[-1].stop_string == "€" and detokenizer.output_text == " 5"


def expected_with_stops(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Scan one character at a time; the first stop string to complete wins."""
    for end in range(1, len(text) + 1):
        matches = [s for s in stops if text[:end].endswith(s)]
        if matches:
            longest = max(matches, key=len)
            return text[: end if include else end - len(longest)], longest
    return text, None


@pytest.mark.parametrize("name", TOKENIZERS)
@PROPERTY
@given(data=st.data())
def test_stop_strings_cut_where_a_character_scan_would(name: str, data: st.DataObject) -> None:
    tokenizer = TOKENIZERS[name]
    stops = data.draw(st.lists(st.text("ab#€ ", min_size=1, max_size=3), min_size=1, max_size=3))
    include = data.draw(st.booleans(), label="include_stop_str_in_output")
    prompt = data.draw(token_sequences(tokenizer), label="prompt")
    output = ids(tokenizer, data.draw(st.text("ab#€ c", max_size=30), label="output text"))
    detokenizer = IncrementalDetokenizer(
        tokenizer, prompt, stop=stops, include_stop_str_in_output=include
    )
    steps = stream(detokenizer, output)
    stopped = any(step.stopped for step in steps)
    if not stopped:
        detokenizer.flush()
    in_context = text_in_context(tokenizer, prompt, output)
    expected, stop_string = expected_with_stops(in_context, stops, include)
    assert detokenizer.output_text == expected
    assert detokenizer.stop_string == stop_string
    assert stopped == (stop_string is not None)


# --- resume, bounds -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOKENIZERS)
@PROPERTY
@given(data=st.data())
def test_resume_emits_only_the_new_text(name: str, data: st.DataObject) -> None:
    tokenizer = TOKENIZERS[name]
    prompt = data.draw(token_sequences(tokenizer), label="prompt")
    output = data.draw(token_sequences(tokenizer), label="output")
    split = data.draw(st.integers(0, len(output)), label="split")
    before = IncrementalDetokenizer(tokenizer, prompt, stop=["##"])
    sent_before = "".join(step.text for step in stream(before, output[:split]))
    resumed = IncrementalDetokenizer(
        tokenizer, prompt, stop=["##"], initial_output_ids=output[:split]
    )
    if before.stop_string is not None:
        return  # that sequence was finished before the resume
    steps = stream(resumed, output[split:])
    if not any(step.stopped for step in steps):
        resumed.flush()
    uninterrupted = IncrementalDetokenizer(tokenizer, prompt, stop=["##"])
    stream(uninterrupted, output)
    uninterrupted.flush()
    assert sent_before + resumed.output_text == uninterrupted.output_text


def test_resume_after_a_word_keeps_the_next_words_space() -> None:
    prompt = ids(SENTENCEPIECE, "Q:")
    output = ids(SENTENCEPIECE, "Q: the cat sat")[len(prompt) :]
    assert str(SENTENCEPIECE.id_to_token(output[-1])).startswith("▁")
    resumed = IncrementalDetokenizer(SENTENCEPIECE, prompt, initial_output_ids=output[:-1])
    assert resumed.push(output[-1]).text == " sat"
    assert resumed.output_text == " sat"


def test_resume_sends_text_held_back_before_the_interruption() -> None:
    sent = ids(SENTENCEPIECE, "a€")[:-1]  # "a" and the first two bytes of "€"
    resumed = IncrementalDetokenizer(SENTENCEPIECE, [], initial_output_ids=sent)
    assert resumed.push(token_id(SENTENCEPIECE, "<0xAC>")).text == "€"
    held = IncrementalDetokenizer(
        BYTE_LEVEL, [], stop=["###"], initial_output_ids=ids(BYTE_LEVEL, "a#")
    )
    assert held.push(ids(BYTE_LEVEL, "b")[0]).text == "#b"


class CountingTokenizer:
    """Delegates to a real tokenizer and records how many ids each decode call gets."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoded_lengths: list[int] = []

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded_lengths.append(len(token_ids))
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name: str) -> object:
        return getattr(self.tokenizer, name)


def test_work_per_token_does_not_grow_with_the_output() -> None:
    counting = CountingTokenizer(SENTENCEPIECE)
    output = ids(SENTENCEPIECE, "the cat sat on the mat, 你好 😀 ### done. " * 60)
    detokenizer = IncrementalDetokenizer(counting, ids(SENTENCEPIECE, "Q: " * 50), stop=["###!"])  # type: ignore[arg-type]
    counting.decoded_lengths.clear()
    stream(detokenizer, output)
    assert len(output) > 1000
    assert len(counting.decoded_lengths) <= 2 * len(output)
    assert max(counting.decoded_lengths) <= 8


def test_invalid_bytes_are_sent_after_a_bounded_wait() -> None:
    continuation_byte = token_id(BYTE_LEVEL, "Ģ")  # byte 0x80 in the GPT-2 byte alphabet
    assert BYTE_LEVEL.decode([continuation_byte]) == FFFD
    invalid = [continuation_byte] * 100  # every prefix decodes to text ending in U+FFFD
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [])
    sent = "".join(step.text for step in stream(detokenizer, invalid))
    assert len(sent) >= 100 - 32  # a bounded wait, not until the end
    stream(detokenizer, ids(BYTE_LEVEL, " ok"))
    detokenizer.flush()
    assert detokenizer.output_text == BYTE_LEVEL.decode([*invalid, *ids(BYTE_LEVEL, " ok")])
