"""The corruptions: which corrupt run a screen patches from, by name (:data:`CORRUPTIONS`).

    str     the task's corrupt prompts: key tokens swapped for similar ones of the same token length
            (symmetric token replacement; IOI: the S2 swap, facts: the subject swap)
    abc     IOI only: S2 replaced by a third name, so IO, S1 and S2 are three different names
            (Wang et al.'s "ABC" distribution); the same clean prompts as str
    noise   Gaussian noise on the clean prompt's key-token embeddings (causal tracing, Meng et al.)

Not every task has every corruption (:data:`TASK_CORRUPTIONS`; a task file has str and noise).
"""

import torch
from torch import Tensor

from .batch import PromptBatch

CORRUPTIONS = ("str", "abc", "noise")
WORDS = {"str": "token replacement", "abc": "IOI's third name at S2", "noise": "Gaussian noise"}
STR_WORDS = {"ioi": "the S2 swap", "facts": "the subject swap", "induction": "the copied token swapped"}
TASK_CORRUPTIONS = {"ioi": ("str", "abc", "noise"), "facts": ("str", "noise"), "induction": ("str", "noise")}
FILE_CORRUPTIONS = ("str", "noise")  # a task file's pairs have one corrupt prompt each


def check_corruption(name: str, task: str | None = None) -> None:
    """Refuse an unknown corruption, or one ``task`` (a built-in name or a file) does not have."""
    if name not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption {name!r}; known: "
                         + ", ".join(f"{c} ({WORDS[c]})" for c in CORRUPTIONS))
    if task is not None and name not in TASK_CORRUPTIONS.get(task, FILE_CORRUPTIONS):
        has = TASK_CORRUPTIONS.get(task, FILE_CORRUPTIONS)
        what = f"task {task!r}" if task in TASK_CORRUPTIONS else f"task file {task!r}"
        raise ValueError(f"{what} has no corruption {name!r} ({WORDS[name]}); its corruptions: "
                         + ", ".join(f"{c} ({STR_WORDS.get(task, WORDS[c]) if c == 'str' else WORDS[c]})"
                                     for c in has))


def prompts_of(corruption: str) -> str:
    """Which corrupt prompts a corruption's pairs carry: ``abc`` its own, every other the task's (str)."""
    return "abc" if corruption == "abc" else "str"


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
