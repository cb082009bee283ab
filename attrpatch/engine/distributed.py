"""Data parallelism over prompt sets with torch.distributed (torchrun): each rank screens a shard of the
prompts; scores, baselines, effects and diagnostics are all-reduced as prompt-weighted means, so every
rank holds the single-process result and rank 0 writes the report.

    torchrun --nproc_per_node 2 -m attrpatch.cli screen --task ioi --out runs/ioi    # gloo on CPU, nccl on GPU
"""

import os

import torch
import torch.distributed as dist
from torch import Tensor

from ..inputs.batch import PromptBatch


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def shard(batch: PromptBatch) -> PromptBatch:
    """This rank's contiguous slice of the prompts (sizes differ by at most one)."""
    if not active():
        return batch
    world, r = dist.get_world_size(), dist.get_rank()
    bounds = [batch.n * i // world for i in range(world + 1)]
    if bounds[r + 1] == bounds[r]:
        raise ValueError(f"{batch.n} prompts cannot be split over {world} ranks; use fewer ranks")
    return batch.rows(slice(bounds[r], bounds[r + 1]))


def total(n_local: int) -> int:
    if not active():
        return n_local
    t = torch.tensor([n_local], dtype=torch.float64)
    dist.all_reduce(t)
    return int(t.item())


def mean(value, n_local: int, n_total: int):
    """Prompt-weighted mean across ranks of a local mean (tensor, float, or dict/list of them)."""
    if not active():
        return value
    if isinstance(value, dict):
        return {k: mean(v, n_local, n_total) for k, v in value.items()}
    if isinstance(value, list):
        return [mean(v, n_local, n_total) for v in value]
    if isinstance(value, Tensor):
        t = (value.detach().double() * n_local).cpu()
        dist.all_reduce(t)
        return (t / n_total).to(value.dtype).to(value.device)
    t = torch.tensor([float(value) * n_local], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / n_total)


def gather(value: Tensor) -> Tensor:
    """Every rank's [n_local, ...] rows concatenated in rank order (the global prompt order, as shards are
    contiguous); identity in a single process."""
    if not active():
        return value
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value.detach().cpu())
    return torch.cat(parts).to(value.device)
