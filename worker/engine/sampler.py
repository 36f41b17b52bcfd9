"""The batched sampler: turns one step's logits into one token (and optional logprobs) per sequence.

It owns the decoding knobs of `common.protocol.Sampling`, applied as HF and vLLM do:

    penalties (repetition, frequency, presence) on the raw logits
    -> greedy rows take the argmax
    -> temperature -> top-k -> top-p -> min-p -> typical-p -> draw

Everything is a tensor op over the whole [S, V] batch (or over the rows that use a knob); Python
loops only build penalty indices and draw per-sequence noise. Decisions worth knowing:

* Logprobs come from the raw logits (before penalties, temperature and truncation), as vLLM's
  default and the OpenAI API report them.
* The draw is an exponential race: argmax(probs / E) with E ~ Exponential(1), one E per vocab
  entry. A sequence with a seed draws its V noise values from its own `torch.Generator`, so its
  tokens do not depend on what else is in the batch; the others share one batched draw.
* The filters match transformers' logits warpers; top-p looks at the best `TOP_P_CANDIDATES`
  tokens first and sorts the full vocabulary only for rows whose mass is spread wider than that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from common.protocol import Sampling, TokenLogprob
from worker import kernels

# Top-p keeps the most probable tokens until their mass reaches p; it almost always stops long
# before this many, and a top-k of 1,024 costs a tenth of a full sort of a 49k vocabulary.
TOP_P_CANDIDATES = 1024

# Dividing by a smaller temperature could overflow fp32 logits to inf (and softmax to NaN); at
# this temperature the draw is already the argmax for any realistic logit gap.
MIN_TEMPERATURE = 1e-6

_FILTERED = float("-inf")


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence sampled this step."""

    sampling: Sampling  # the request's knobs; temperature 0 (or top_k 1) = greedy
    prompt_ids: Sequence[int]  # repetition penalty looks at prompt + output
    output_ids: Sequence[int]  # frequency / presence penalties look at output only
    generator: torch.Generator | None  # the sequence's own randomness (seeded); None = shared
    num_logprobs: int | None  # None = no logprobs; k >= 0 = chosen token + top-k alternatives


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row, in row order
    logprobs: list[TokenLogprob | None]  # one per row; None where the row asked for none


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one seeded sequence, on the device its logits live on."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Picks the next token of every sequence in a step (see the module docstring)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Randomness for rows without a seed; None = torch's default generator of the device.
        self._generator = generator

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"sampler got logits of shape {tuple(logits.shape)} for {len(rows)} rows; "
                f"expected ({len(rows)}, vocab)"
            )
        logits = logits.float()
        if all(_is_plain_greedy(row) for row in rows):
            return SamplerOutput(_argmax(logits).tolist(), [None] * len(rows))

        penalised = apply_penalties(logits, rows)
        sampled = [i for i, row in enumerate(rows) if not row.sampling.greedy]
        if len(sampled) == len(rows):
            token_ids = self._draw(penalised, rows)
        else:
            token_ids = penalised.argmax(dim=-1)
            if sampled:
                sampled_rows = [rows[i] for i in sampled]
                token_ids[sampled] = self._draw(penalised[sampled], sampled_rows)
        return SamplerOutput(token_ids.tolist(), gather_logprobs(logits, rows, token_ids))

    def _draw(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Samples one token per row from the warped distribution (exponential race)."""
        probs = torch.softmax(apply_warpers(logits, rows), dim=-1)
        return (probs / self._exponential_noise(rows, probs)).argmax(dim=-1)

    def _exponential_noise(self, rows: list[SamplingRow], probs: torch.Tensor) -> torch.Tensor:
        noise = torch.empty_like(probs)
        shared = [i for i, row in enumerate(rows) if row.generator is None]
        if len(shared) == len(rows):
            noise.uniform_(generator=self._generator)
        elif shared:
            noise[shared] = torch.empty_like(noise[shared]).uniform_(generator=self._generator)
        for i, row in enumerate(rows):
            if row.generator is not None:
                # Exactly V draws per step from the row's own generator: the seed alone decides.
                noise[i].uniform_(generator=row.generator)
        # E = -log(1 - U). Floored above zero so a zero-probability token can never win with 0/0.
        noise.neg_().log1p_().neg_()
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _is_plain_greedy(row: SamplingRow) -> bool:
    return row.sampling.greedy and not _has_penalty(row.sampling) and row.num_logprobs is None


def _has_penalty(sampling: Sampling) -> bool:
    return (
        sampling.repetition_penalty != 1.0
        or sampling.frequency_penalty != 0.0
        or sampling.presence_penalty != 0.0
    )


# --- penalties -------------------------------------------------------------------------------


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (HF: positive logits divided, negative multiplied, over prompt + output, once per
    token), then frequency and presence (OpenAI: over output tokens). Returns a new tensor when
    some row has a penalty; the input is never modified."""
    picked = [i for i, row in enumerate(rows) if _has_penalty(row.sampling)]
    if not picked:
        return logits
    picked_rows = [rows[i] for i in picked]
    sub = logits[picked]
    counts = _token_counts(picked_rows, [row.output_ids for row in picked_rows], sub)
    sub = _repetition_penalty(sub, picked_rows, counts)

    def per_row(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=sub.dtype, device=sub.device).unsqueeze(1)

    frequency = per_row([row.sampling.frequency_penalty for row in picked_rows])
    presence = per_row([row.sampling.presence_penalty for row in picked_rows])
    sub = sub - counts * frequency - (counts > 0).to(sub.dtype) * presence
    penalised = logits.clone()
    penalised[picked] = sub
    return penalised


def _repetition_penalty(
    logits: torch.Tensor, rows: list[SamplingRow], output_counts: torch.Tensor
) -> torch.Tensor:
    penalties = [row.sampling.repetition_penalty for row in rows]
    if all(penalty == 1.0 for penalty in penalties):
        return logits
    prompts = [row.prompt_ids if row.sampling.repetition_penalty != 1.0 else () for row in rows]
    seen = (output_counts > 0) | (_token_counts(rows, prompts, logits) > 0)
    penalty = torch.tensor(penalties, dtype=logits.dtype, device=logits.device).unsqueeze(1)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def _token_counts(
    rows: list[SamplingRow], token_lists: list[Sequence[int]], like: torch.Tensor
) -> torch.Tensor:
    """[rows, V] float counts of each token id in each row's list."""
    counts = torch.zeros_like(like)
    lengths = [len(tokens) for tokens in token_lists]
    if sum(lengths) == 0:
        return counts
    row_index = torch.repeat_interleave(
        torch.arange(len(rows), device=like.device), torch.tensor(lengths, device=like.device)
    )
    token_index = torch.tensor(
        [token for tokens in token_lists for token in tokens], dtype=torch.long, device=like.device
    )
    ones = torch.ones(token_index.shape[0], dtype=like.dtype, device=like.device)
    return counts.index_put_((row_index, token_index), ones, accumulate=True)


# --- warpers: temperature and the truncation filters ----------------------------------------


def apply_warpers(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p and typical-p, each only on the rows that use it.
    Filtered entries become -inf; every filter keeps at least the most likely token."""
    temperatures = [max(row.sampling.temperature, MIN_TEMPERATURE) for row in rows]
    if any(t != 1.0 for t in temperatures):
        logits = logits / torch.tensor(temperatures, device=logits.device).unsqueeze(1)
    else:
        logits = logits.clone()
    settings = [row.sampling for row in rows]
    vocab = logits.shape[1]
    _filter_rows(logits, [s.top_k for s in settings], lambda k: 0 < k < vocab, top_k_mask)
    _filter_rows(logits, [s.top_p for s in settings], lambda p: p < 1.0, top_p_mask)
    _filter_rows(logits, [s.min_p for s in settings], lambda p: p > 0.0, min_p_mask)
    _filter_rows(logits, [s.typical_p for s in settings], lambda p: p < 1.0, typical_p_mask)
    return logits


def _filter_rows(
    logits: torch.Tensor,
    values: Sequence[float],
    is_on: Callable[[float], bool],
    removal_mask: Callable[[torch.Tensor, list[float]], torch.Tensor],
) -> None:
    """Sets to -inf, in place, what `removal_mask` removes, on the rows whose knob is on."""
    picked = [i for i, value in enumerate(values) if is_on(value)]
    if not picked:
        return
    if len(picked) == len(values):
        logits.masked_fill_(removal_mask(logits, list(values)), _FILTERED)
        return
    sub = logits[picked]
    logits[picked] = sub.masked_fill(removal_mask(sub, [values[i] for i in picked]), _FILTERED)


def top_k_mask(logits: torch.Tensor, top_ks: list[float]) -> torch.Tensor:
    """Removes what is below each row's k-th largest logit (ties with it stay, as in HF)."""
    ks = [min(int(k), logits.shape[1]) for k in top_ks]
    kth_index = torch.tensor(ks, device=logits.device).unsqueeze(1) - 1
    kth_value = logits.topk(max(ks), dim=-1).values.gather(1, kth_index)
    return logits < kth_value


def top_p_mask(logits: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    """Keeps each row's smallest set of most likely tokens whose probability reaches p."""
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor(top_ps, dtype=probs.dtype, device=probs.device).unsqueeze(1)
    candidates = min(TOP_P_CANDIDATES, probs.shape[1])
    best_probs, best_ids = probs.topk(candidates, dim=-1)
    remove = _top_p_remove_sorted(probs, best_probs, best_ids, top_p)
    if candidates == probs.shape[1]:
        return remove
    # Rows whose candidates do not reach p need the whole vocabulary, sorted.
    wide = (best_probs.cumsum(dim=-1)[:, -1:] < top_p).squeeze(1).nonzero().squeeze(1)
    if wide.numel() > 0:
        sorted_probs, sorted_ids = probs[wide].sort(dim=-1, descending=True)
        remove[wide] = _top_p_remove_sorted(probs[wide], sorted_probs, sorted_ids, top_p[wide])
    return remove


def _top_p_remove_sorted(
    probs: torch.Tensor, sorted_probs: torch.Tensor, sorted_ids: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """A token stays when the mass of the tokens ranked above it is still below p; tokens
    outside `sorted_ids` (a best-first prefix of the vocabulary) are removed."""
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_above < top_p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, sorted_ids, keep_sorted)
    return ~keep


def min_p_mask(logits: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    """Removes tokens less likely than min_p times the most likely one (HF's MinPLogitsWarper)."""
    probs = torch.softmax(logits, dim=-1)
    min_p = torch.tensor(min_ps, dtype=probs.dtype, device=probs.device).unsqueeze(1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    return remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)


def typical_p_mask(logits: torch.Tensor, masses: list[float]) -> torch.Tensor:
    """Locally typical sampling (HF's TypicalLogitsWarper): rank tokens by how far their surprise
    is from the entropy, keep the closest ones until their mass reaches typical_p."""
    mass = torch.tensor(masses, dtype=logits.dtype, device=logits.device).unsqueeze(1)
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs * log_probs.exp()).nansum(dim=-1, keepdim=True)
    distance = (-log_probs - entropy).abs()
    sorted_distance, sorted_ids = distance.sort(dim=-1)
    cumulative = logits.gather(1, sorted_ids).softmax(dim=-1).cumsum(dim=-1)
    last_kept = (cumulative < mass).sum(dim=1, keepdim=True).clamp_(max=logits.shape[1] - 1)
    remove_sorted = sorted_distance > sorted_distance.gather(1, last_kept)
    return remove_sorted.scatter(1, sorted_ids, remove_sorted)


# --- logprobs --------------------------------------------------------------------------------


LOGPROB_FLOOR = -9999.0


def gather_logprobs(
    raw_logits: torch.Tensor, rows: list[SamplingRow], token_ids: torch.Tensor
) -> list[TokenLogprob | None]:
    """The chosen token's logprob and the top-k alternatives (best first), from the raw logits."""
    picked = [i for i, row in enumerate(rows) if row.num_logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(rows)
    if not picked:
        return result
    # Clamped so a ruled-out token (-inf) still serialises as JSON (which has no infinity).
    log_probs = torch.log_softmax(raw_logits[picked], dim=-1).clamp(min=LOGPROB_FLOOR)
    chosen_ids = token_ids[picked].unsqueeze(1)
    chosen = log_probs.gather(1, chosen_ids).squeeze(1).tolist()
    chosen_id_list = chosen_ids.squeeze(1).tolist()
    wanted = [min(rows[i].num_logprobs or 0, log_probs.shape[1]) for i in picked]
    top_values: list[list[float]] = [[] for _ in picked]
    top_ids: list[list[int]] = [[] for _ in picked]
    if max(wanted) > 0:
        best = log_probs.topk(max(wanted), dim=-1)
        top_values, top_ids = best.values.tolist(), best.indices.tolist()
    for slot, (row_index, k) in enumerate(zip(picked, wanted, strict=True)):
        top = list(zip(top_ids[slot][:k], top_values[slot][:k], strict=True))
        result[row_index] = TokenLogprob(chosen_id_list[slot], chosen[slot], top)
    return result


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first largest logit: the native kernel on the CPU (torch's CPU argmax took
    ~1.2 ms for [32, 49152], a tenth of that for this), else torch."""
    native = kernels.for_tensor(logits)
    if native is not None and logits.is_contiguous() and logits.numel():
        return native.argmax_rows(logits)
    return logits.argmax(dim=-1)
