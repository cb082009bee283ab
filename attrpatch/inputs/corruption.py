"""Corruptions other than the task's own corrupt prompts (symmetric token replacement, the default).

    str     the task's corrupt prompts: key tokens swapped for similar ones of the same token length
    noise   Gaussian noise on the clean prompt's key-token embeddings (causal tracing, Meng et al.)
"""

import torch
from torch import Tensor

from .batch import PromptBatch

CORRUPTIONS = ("str", "noise")


def check_corruption(name: str) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption {name!r}; known: str (token replacement), noise (Gaussian)")


def with_embedding_noise(batch: PromptBatch, embedding: Tensor, std_factor: float = 3.0, seed: int = 0) -> PromptBatch:
    """Gaussian-noise corruption (causal tracing): the corrupt run is the clean prompt with noise of std
    ``std_factor`` x the embeddings' std added at the positions where clean and corrupt differ (the key
    tokens of a symmetric-replacement pair). Out of distribution; offered, not the default.

    embedding: the token embedding matrix [vocab, d_model]."""
    key = (batch.clean != batch.corrupt) & batch.mask.bool()  # [batch, pos]
    if not key.any():
        raise ValueError("no positions to noise: clean and corrupt prompts are identical everywhere")
    g = torch.Generator().manual_seed(seed)
    std = float(embedding.float().std()) * std_factor
    noise = torch.randn(*batch.clean.shape, embedding.shape[1], generator=g) * std * key[..., None]
    return PromptBatch(batch.clean, batch.clean.clone(), batch.mask, batch.answer, batch.wrong, batch.last,
                       noise.to(embedding.dtype))
