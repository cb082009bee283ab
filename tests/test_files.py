"""Output files: safetensors written byte-for-byte the same for the same tensors and metadata, in any process."""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load

from attrpatch.output.files import safetensors_bytes

WRITE = """
import sys, torch
from attrpatch.output.files import safetensors_bytes
tensors = {f"denoise/{m}/{s}": torch.arange(12, dtype=torch.float32).reshape(3, 4) * i
           for i, (m, s) in enumerate([(m, s) for m in ("logit_diff", "kl", "prob") for s in ("head", "neuron")])}
meta = {k: k * 3 for k in ("axes", "note", "senders", "receivers", "model", "task", "direction", "metric")}
sys.stdout.buffer.write(safetensors_bytes(tensors, meta))
"""


def test_the_same_tensors_and_metadata_give_the_same_bytes_in_every_process():
    root = Path(__file__).resolve().parent.parent
    outs = {subprocess.run([sys.executable, "-c", WRITE], capture_output=True, check=True, cwd=root).stdout
            for _ in range(6)}  # safetensors.torch.save alone: 6 different files from 6 processes
    assert len(outs) == 1


def test_canonical_bytes_load_back_to_the_same_tensors_and_metadata():
    tensors = {"b": torch.randn(3, 5), "a": torch.arange(7, dtype=torch.int64), "c": torch.zeros(0)}
    data = safetensors_bytes(tensors, {"z": "1", "a": "2"})
    back = load(data)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        with safe_open(f.name, "pt") as g:
            assert g.metadata() == {"z": "1", "a": "2"}
