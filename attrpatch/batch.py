"""Prompt pairs as padded tensors: the input every later stage reads.

Right padding: position i is token i of every prompt, so positions align across prompts of equal
length, and a causal model's real tokens never attend to pads. The metric is read at each prompt's
last real token (``last``).
"""

from dataclasses import dataclass
from typing import Iterator, Literal, Protocol, Sequence

import torch
from torch import Tensor

DIRECTIONS = ("denoise", "noise")
Direction = Literal["denoise", "noise"]


class PairLike(Protocol):
    clean_ids: Sequence[int]
    corrupt_ids: Sequence[int]
    answer_id: int
    wrong_id: int


@dataclass(frozen=True)
class PromptBatch:
    """clean, corrupt, mask: [batch, pos]; answer, wrong, last: [batch] (long)."""

    clean: Tensor
    corrupt: Tensor
    mask: Tensor
    answer: Tensor
    wrong: Tensor
    last: Tensor

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
        return PromptBatch(*(t.to(device) for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor, ...]:
        return self.clean, self.corrupt, self.mask, self.answer, self.wrong, self.last

    def rows(self, rows: slice) -> "PromptBatch":
        """The prompts in ``rows``, same padded length."""
        return PromptBatch(*(t[rows] for t in self._tensors()))

    def chunks(self, size: int | None) -> Iterator["PromptBatch"]:
        """Consecutive slices of at most ``size`` prompts (all at once for None), same padded length."""
        size = self.n if size is None else size
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        for start in range(0, self.n, size):
            yield self.rows(slice(start, start + size))

    def runs(self, direction: str) -> tuple[Tensor, Tensor]:
        """(source ids, receiver ids): denoise patches clean into corrupt, noise corrupt into clean."""
        check_direction(direction)
        return (self.clean, self.corrupt) if direction == "denoise" else (self.corrupt, self.clean)


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"Unknown direction {direction!r}; known: {', '.join(DIRECTIONS)} "
                         "(denoise: clean -> corrupt, noise: corrupt -> clean).")


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
