"""Files written atomically (a temporary file in the same folder, then a rename), so that a killed run
never leaves a truncated file: JSON (NaN/inf as null), CSV, bytes, and safetensors whose bytes depend on the
tensors and metadata only."""

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch


def write_atomic(path: Path, write: Callable[[io.IOBase], None], binary: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clean(x):
    """JSON-safe: NaN/inf -> None, tensors -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    return x


def write_json(path: Path, obj) -> None:
    write_atomic(path, lambda f: json.dump(_clean(obj), f, indent=2, allow_nan=False))


def write_csv(path: Path, rows: list[dict]) -> None:
    def write(f):
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    write_atomic(path, write)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors.torch.save with its JSON header's keys in sorted order, so that equal inputs give equal bytes:
    the library writes the metadata from a hash map, in an order that changes from process to process.

    File: 8-byte little-endian header length n | header JSON, space-padded to n | tensor data. Reordering the
    header's keys moves no byte of the data (offsets are stored per tensor) and keeps its length."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":")).encode()
    if len(text) > n:  # cannot happen for the same keys and values; keep the library's bytes if it does
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n:]
