"""Prompt pairs as padded tensors: the input every later stage reads.

Right padding: position i is token i of every prompt, so positions align across prompts of equal
length, and a causal model's real tokens never attend to pads. The metric is read at each prompt's
last real token (``last``).
"""

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Protocol, Sequence

import torch
from torch import Tensor

from .directions import source_and_receiver


class PairLike(Protocol):
    clean_ids: Sequence[int]
    corrupt_ids: Sequence[int]
    answer_id: int
    wrong_id: int


class RunInput(NamedTuple):
    """The input of one run: ids [batch, pos], and ``noise`` [batch, pos, d_model] added to the token
    embeddings (Gaussian-noise corruption, "causal tracing"), or None."""

    ids: Tensor
    noise: Tensor | None = None

    def repeat(self, n: int) -> "RunInput":
        """n copies of the batch, copy-major."""
        return RunInput(self.ids.repeat(n, 1), None if self.noise is None else self.noise.repeat(n, 1, 1))


@dataclass(frozen=True)
class PromptBatch:
    """clean, corrupt, mask: [batch, pos]; answer, wrong, last: [batch] (long); noise: None, or
    [batch, pos, d_model] added to the corrupt run's token embeddings (then corrupt == clean ids)."""

    clean: Tensor
    corrupt: Tensor
    mask: Tensor
    answer: Tensor
    wrong: Tensor
    last: Tensor
    noise: Tensor | None = None

    @property
    def n(self) -> int:
        return self.clean.shape[0]

    @property
    def n_pos(self) -> int:
        return self.clean.shape[1]

    @property
    def aligned(self) -> bool:
        """True when every prompt has the full length, so per-position components are meaningful."""
        return bool(self.mask.all())

    def to(self, device: torch.device | str) -> "PromptBatch":
        return PromptBatch(*(None if t is None else t.to(device) for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor | None, ...]:
        return self.clean, self.corrupt, self.mask, self.answer, self.wrong, self.last, self.noise

    def rows(self, rows: slice) -> "PromptBatch":
        """The prompts in ``rows``, same padded length."""
        return PromptBatch(*(None if t is None else t[rows] for t in self._tensors()))

    def run(self, which: str) -> RunInput:
        """The clean or the corrupt run's input."""
        return RunInput(self.clean) if which == "clean" else RunInput(self.corrupt, self.noise)

    def chunks(self, size: int | None) -> Iterator["PromptBatch"]:
        """Consecutive slices of at most ``size`` prompts (all at once for None), same padded length."""
        size = self.n if size is None else size
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        for start in range(0, self.n, size):
            yield self.rows(slice(start, start + size))

    def runs(self, direction: str) -> tuple[RunInput, RunInput]:
        """(source, receiver) inputs of ``direction`` (directions.RUNS)."""
        source, receiver = source_and_receiver(direction)
        return self.run(source), self.run(receiver)


def make_batch(pairs: Sequence[PairLike], pad_id: int = 0) -> PromptBatch:
    """Pad ``pairs`` (objects with clean_ids, corrupt_ids, answer_id, wrong_id) on the right."""
    if len(pairs) == 0:
        raise ValueError("no prompt pairs given; pass at least one pair")
    for i, p in enumerate(pairs):
        if len(p.clean_ids) != len(p.corrupt_ids):
            raise ValueError(f"pair {i}: clean has {len(p.clean_ids)} tokens {list(p.clean_ids)}, corrupt has "
                             f"{len(p.corrupt_ids)} {list(p.corrupt_ids)}; they need the same token length")
        if len(p.clean_ids) == 0:
            raise ValueError(f"pair {i}: empty prompt")
    n_pos = max(len(p.clean_ids) for p in pairs)
    shape = (len(pairs), n_pos)
    clean = torch.full(shape, pad_id, dtype=torch.long)
    corrupt = torch.full(shape, pad_id, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    for i, p in enumerate(pairs):
        n = len(p.clean_ids)
        clean[i, :n] = torch.tensor(list(p.clean_ids))
        corrupt[i, :n] = torch.tensor(list(p.corrupt_ids))
        mask[i, :n] = 1
    return PromptBatch(
        clean=clean, corrupt=corrupt, mask=mask,
        answer=torch.tensor([int(p.answer_id) for p in pairs]),
        wrong=torch.tensor([int(p.wrong_id) for p in pairs]),
        last=mask.sum(1) - 1,
    )


def fingerprint(batch: PromptBatch) -> int:
    """A hash of every tensor of the prompt batch: the key of runs shared between calls on the same prompts
    (``patch(runs=...)``, ``attribute(sources=...)``)."""
    return hash(tuple(None if t is None else (tuple(t.shape), t.detach().cpu().numpy().tobytes())
                      for t in (batch.clean, batch.corrupt, batch.mask, batch.answer, batch.wrong, batch.last,
                                batch.noise)))
