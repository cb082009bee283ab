"""Out of memory: a unit of work that runs out of device memory is retried as two halves, down to one.

    exact patching (patching/exact.py), edge patching (edges/patching.py):
        a pass of ``copies`` patched copies  ->  two passes of copies // 2 and the rest     (``halve``)
    attribution, node (estimators/attribution.py) and edge (edges/eap.py):
        a chunk of ``n`` prompts             ->  the rest of the run at n // 2 prompts per chunk (``run_chunks``)

Attribution's scores are sums over prompts, so smaller chunks add up to the scores of the whole run (to
float rounding). A chunk that fails leaves no trace: its sums reach the totals only when it completes, and
the rows it wrote are zeroed. Each retry is warned (the CLI prints it as ``attrpatch: warning: ...``), with
the setting that would have started there; one prompt, or one copy, that still does not fit re-raises.
"""

import warnings
from typing import Callable

import torch
from torch import Tensor

from ..inputs.batch import PromptBatch


def halve(items: list, what: str, device: torch.device) -> list[list]:
    """``items`` that ran out of memory in one pass as two lists of half of them each; ``what`` names the
    pass in the warning ("patching 8 copies x 4 prompts"). Frees the device's cached blocks first."""
    half = len(items) // 2
    warnings.warn(f"out of memory {what} at once; retrying with {half} copies per pass (pass copies={half} "
                  "to start there)")
    _free(device)
    return [items[:half], items[half:]]


def run_chunks(batch: PromptBatch, batch_size: int | None, run: Callable[[PromptBatch, int, dict], None], *,
               summed: dict, rows: dict | None = None, device: torch.device,
               what: str = "attributing") -> tuple[int, int]:
    """Run ``run(part, start, into)`` over consecutive chunks of at most ``batch_size`` prompts (all at once
    for None); returns the batch size the run ended with and how many chunks completed.

    part: the chunk, whose prompts are ``batch``'s rows start .. start + part.n.
    into: where the chunk adds its sums: a nested dict of tensors shaped as ``summed`` (which starts at
        zero): ``summed`` itself while no chunk has completed, else a zeroed scratch copy added to
        ``summed`` once the chunk completes (one copy of ``summed`` more in memory, only with several chunks).
    rows: a nested dict of tensors [batch, ...] the chunk writes at its own rows only; zeroed there when
        it fails.

    A chunk of n prompts that raises torch.OutOfMemoryError is undone and the run goes on from its first
    prompt at batch size n // 2 (warned), as if started there; at one prompt the error is re-raised with
    what needs less memory."""
    size = batch.n if batch_size is None else batch_size
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    start, done, scratch = 0, 0, None
    while start < batch.n:
        n = min(size, batch.n - start)
        if start > 0 and scratch is None:
            scratch = _tree(summed, torch.zeros_like)
        into = summed if start == 0 else scratch
        try:
            run(batch.rows(slice(start, start + n)), start, into)
            failed = False
        except torch.OutOfMemoryError as err:
            if n == 1:
                raise torch.OutOfMemoryError(
                    f"out of memory {what} even one prompt at a time (device {device}): {err}. Needs less "
                    "memory: --low-memory, --dtype bfloat16, --device-map auto, or a larger device; the run's "
                    "completed steps are saved, so rerun with --resume to continue") from err
            failed = True  # out of the except block: the error's frames, and the chunk's tensors, are freed
        if failed:
            _tree(into, Tensor.zero_)
            _tree(rows or {}, lambda t: t[start:start + n].zero_())
            size = n // 2
            warnings.warn(f"out of memory {what} {n} prompts at once; retrying with {size} prompts per batch "
                          f"(pass batch_size={size}, --batch-size {size}, to start there)")
            _free(device)
            continue
        if into is scratch:
            for total, part in zip(_leaves(summed), _leaves(scratch)):
                total.add_(part)
                part.zero_()
        start, done = start + n, done + 1
    return size, done


def retried(size: int, batch_size: int | None, n_prompts: int) -> dict[str, int]:
    """{"batch_size": the batch size a run ended with} when out of memory halved it (for its cost), else {}."""
    return {"batch_size": size} if size < min(batch_size or n_prompts, n_prompts) else {}


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _tree(tree, fn):
    """``fn`` on every tensor of a nested dict (in insertion order); the same nesting of its results."""
    if isinstance(tree, dict):
        return {k: _tree(v, fn) for k, v in tree.items()}
    return fn(tree)


def _leaves(tree) -> list[Tensor]:
    out: list[Tensor] = []
    _tree(tree, out.append)
    return out
