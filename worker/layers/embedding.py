"""Vocabulary-parallel token embedding and LM head: each rank holds a contiguous slice of the
vocabulary (padded so it splits evenly); embeddings are summed across ranks, logits gathered."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.layers.linear import PackableLinear, attach_loader
from worker.layers.parallel import SINGLE, ParallelContext


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext = SINGLE):
        super().__init__()
        self.parallel = parallel
        self.vocab_size = vocab_size
        padded = -(-vocab_size // parallel.world_size) * parallel.world_size
        self.vocab_per_rank = padded // parallel.world_size
        self.vocab_start = parallel.rank * self.vocab_per_rank
        self.weight = nn.Parameter(
            torch.zeros(self.vocab_per_rank, hidden_size), requires_grad=False
        )
        attach_loader(self.weight, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        end = min(self.vocab_start + self.vocab_per_rank, self.vocab_size)
        rows = loaded[self.vocab_start : end]
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_per_rank)
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)
        embedded.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.parallel.all_reduce(embedded)


class ParallelLMHead(VocabParallelEmbedding, PackableLinear):
    """Logits over the vocabulary; with tied embeddings it shares the embedding's weight (and,
    packed, keeps it for the embedding)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.parallel.all_gather_last_dim(self.matmul(hidden))
        return logits[..., : self.vocab_size]
