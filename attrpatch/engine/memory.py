"""Memory of a run, op by op: every tensor storage an op allocates is counted from the moment the op returns
it until it is freed, per device and per named phase, on real tensors (measured) and on meta tensors
(planned: the same ops run, with shapes and no data, no weights read and no compute).

    tracker = MemoryTracker(model)            # the model's weights: live from the start
    with tracker:                             # a TorchDispatchMode: sees every aten op, autograd's too
        with tracker.phase("attribution"):
            ...
    tracker.summary()  # {"peak_bytes", "weights_bytes", "devices": {device: peak}, "phases": {name: ..}, "largest"}

What counts: each untyped storage once, keyed by its StorageImpl (``_cdata``), however many views share it;
it is live until a weakref finalizer on the storage says its last tensor is gone. An op output whose storage
belongs to one of the op's inputs (a view, an in-place or ``out=`` op) allocates nothing. Storages that
exist before tracking count only when registered (``MemoryTracker(model)``: parameters and buffers, the
weights). What does not count: an op's internal workspace (a fused kernel's scratch), allocator caching and
fragmentation, storages made without an aten op, and a storage resized in place.

On meta tensors the ops that read values cannot run; the tracker answers them as if every read were of an
unpadded batch with no shared prefix: a scalar read (``.item()``, ``bool()``) is True for a bool tensor and
0 otherwise, ``nonzero`` finds one zero index, and a copy off the meta device is zeros. A planned run then
takes the branches a real run of full-length prompts that differ from the first position takes.

On meta tensors ``scaled_dot_product_attention`` has no fused kernel and falls back to its math form, which
keeps the [batch, head, pos, pos] attention matrix that CPU and CUDA kernels never make; ``fused_attention``
runs the CPU flash kernel's meta form instead (the same outputs, the same saved tensors).
"""

import weakref
from contextlib import contextmanager
from unittest import mock
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
READS = (aten._local_scalar_dense.default, aten.nonzero.default, aten._to_copy.default, aten.equal.default)


def storage_key(t: Tensor) -> int:
    """The identity of a tensor's storage (its StorageImpl), the same for every view of it."""
    return t.untyped_storage()._cdata


@dataclass
class Peak:
    """Bytes live at the start of a phase and at its end, and the most at once, in all and per device."""

    start_bytes: int = 0
    end_bytes: int = 0
    peak_bytes: int = 0
    devices: dict[str, int] = field(default_factory=dict)

    def see(self, total: int, device: str, on_device: int) -> None:
        self.peak_bytes = max(self.peak_bytes, total)
        self.devices[device] = max(self.devices.get(device, 0), on_device)

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "start_bytes": self.start_bytes, "end_bytes": self.end_bytes,
                "devices": dict(self.devices)}


class MemoryTracker(TorchDispatchMode):
    """Count live tensor storages as ops allocate them and as they are freed (module docstring).

    model: its parameters and buffers are registered as live weights (``weights_bytes``); ``register``
    adds other tensors that exist before tracking starts."""

    def __init__(self, model: nn.Module | None = None):
        super().__init__()
        self.live: dict[int, tuple[str, int]] = {}  # storage key -> (device, bytes)
        self.current: dict[str, int] = {}  # device -> bytes live
        self.total = Peak()
        self.phases: dict[str, Peak] = {}
        self.active: list[Peak] = []  # the phases open now, outermost first
        self.largest: dict | None = None  # the largest storage allocated: bytes, shape, dtype, op, phase
        self.weights_bytes = 0
        self._names: list[str] = []
        if model is not None:
            self.weights_bytes = self.register([*model.parameters(), *model.buffers()])

    def register(self, tensors) -> int:
        """Count storages that already exist (not yet counted) as live; returns the bytes added."""
        return sum(self._add(t, None) for t in tensors if isinstance(t, Tensor))

    @property
    def live_bytes(self) -> int:
        return sum(self.current.values())

    @contextmanager
    def phase(self, name: str) -> Iterator[Peak]:
        """Peaks inside the block go to phase ``name`` (and to every phase open around it); a phase entered
        twice keeps the larger peak."""
        record = self.phases.setdefault(name, Peak(start_bytes=self.live_bytes))
        for device, on_device in self.current.items():
            if on_device:
                record.see(self.live_bytes, device, on_device)
        self.active.append(record)
        self._names.append(name)
        try:
            yield record
        finally:
            self.active.pop()
            self._names.pop()
            record.end_bytes = self.live_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = _tensors((*args, *kwargs.values()))
        if func in READS and any(t.device.type == "meta" for t in flat):
            answer = _read_meta(func, args, kwargs)
            if answer is not NotImplemented:
                return answer
        out = func(*args, **kwargs)
        inputs = {storage_key(t) for t in flat}
        for t in _tensors(out if isinstance(out, (tuple, list)) else (out,)):
            if storage_key(t) not in inputs:
                self._add(t, func)
        return out

    def _add(self, t: Tensor, func) -> int:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return 0
        size, device = storage.nbytes(), str(storage.device)
        self.live[key] = (device, size)
        weakref.finalize(storage, self._free, key)
        self.current[device] = self.current.get(device, 0) + size
        total = self.live_bytes
        for record in (self.total, *self.active):
            record.see(total, device, self.current[device])
        if func is not None and (self.largest is None or size > self.largest["bytes"]):
            self.largest = {"bytes": size, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                            "op": str(func.overloadpacket.__name__), "device": device,
                            "phase": self._names[-1] if self._names else None}
        return size

    def _free(self, key: int) -> None:
        found = self.live.pop(key, None)
        if found is not None:
            device, size = found
            self.current[device] -= size

    def summary(self) -> dict:
        """{"peak_bytes", "weights_bytes", "devices": {device: peak bytes}, "phases": {name: Peak dict},
        "largest": the largest storage an op allocated, or None}."""
        return {"peak_bytes": self.total.peak_bytes, "weights_bytes": self.weights_bytes,
                "devices": dict(self.total.devices), "phases": {n: p.to_dict() for n, p in self.phases.items()},
                "largest": self.largest}


def _tensors(values) -> list[Tensor]:
    """The tensors among an op's arguments or outputs: tensors, and tensors in lists (aten nests no deeper)."""
    found = []
    for v in values:
        if isinstance(v, Tensor):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            found += [t for t in v if isinstance(t, Tensor)]
    return found


def _read_meta(func, args, kwargs):
    """The answer to a value read of a meta tensor (module docstring), or NotImplemented to run the op."""
    if func is aten._local_scalar_dense.default:
        return True if args[0].dtype == torch.bool else 0
    if func is aten.equal.default:
        return True
    if func is aten.nonzero.default:
        return torch.zeros(1, args[0].ndim, dtype=torch.long, device=args[0].device)
    device = kwargs.get("device")
    if func is aten._to_copy.default and device is not None and torch.device(device).type != "meta":
        src = args[0]
        return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype, device=device)
    return NotImplemented


@contextmanager
def fused_attention() -> Iterator[None]:
    """While open, ``F.scaled_dot_product_attention`` on meta tensors runs the fused CPU flash kernel's meta
    form (out and logsumexp, no attention matrix) instead of the math fallback; other tensors are untouched.
    Grouped-query keys and values go in as they are (the kernel takes fewer key-value heads)."""
    plain = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta":
            return plain(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
        return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                attn_mask=attn_mask, scale=scale)[0]
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", sdpa):
        yield
