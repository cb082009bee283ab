"""Sparse dictionaries (SAEs and transcoders): loading one, and its encoder and decoder.

An SAE reads the activation x [batch, pos, d_model] at one hook point (``resid_pre``, ``attn_out`` or
``mlp_out`` at a layer) and writes it back as d_sae latents (d_sae: the dictionary's width). A transcoder
(``out_site`` set) reads x at one hook point of a layer and writes another of the same layer: it reads
``resid_mid`` (the residual stream after attention, the MLP's norm's input; TransformerLens's
``hook_resid_mid`` and ``hook_mlp_in``) or ``mlp_in`` (the MLP's own input, after its norm; TL's
``ln2.hook_normalized``) and writes ``mlp_out``, so its latents stand in for the MLP:

    n, (scale, shift) = normalise(x)                       (identity unless ``normalize``)
    pre  = (n - apply_b_dec_to_input * b_dec) @ W_enc + b_enc                  [batch, pos, d_sae]
    f    = relu(pre)                                       standard
           relu(pre) * (pre > threshold)                   jumprelu
           relu(pre) on the k largest of pre, else 0       topk
    decode(f) = (f @ W_dec + b_dec) * scale + shift                            [batch, pos, d_out]

normalize (sae-lens's ``normalize_activations``):
    none                      scale 1, shift 0
    expected_average_only_in  n = x * norm_scaling_factor; scale 1 / factor (factor 1 when cfg.json has none,
                              as sae-lens's disk loader leaves it)
    constant_norm_rescale     n = x * sqrt(d_model) / |x|; scale |x| / sqrt(d_model)
    layer_norm                n = (x - mean) / (std + 1e-5); scale std, shift mean (sae-lens's inverse)

W_enc [d_model, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out], threshold [d_sae]; d_out = d_model
(a transcoder's output is the model's width too). A transcoder (sae-lens's ``transcoder``,
``jumprelu_transcoder``; cfg.json's ``hook_name_out`` and ``d_out``) neither subtracts b_dec from its input nor
normalises it; a skip transcoder (``W_skip``) is refused: its x @ W_skip term is neither a latent nor error.

Two file forms (``load_dictionary("PATH[@hook]")``):
  - a folder in sae-lens's saved format: cfg.json (``architecture``, ``d_in``, ``d_sae``, ``k``,
    ``apply_b_dec_to_input``, ``normalize_activations``, and ``hook_name`` at the top level (sae-lens <= 5) or
    in ``metadata`` (sae-lens 6)) and sae_weights.safetensors;
  - a safetensors file with W_enc, b_enc, W_dec, b_dec (+ threshold: jumprelu), whose hook is given as @hook.
Hooks are TransformerLens names (``blocks.3.hook_resid_pre``, ``hook_attn_out``, ``hook_mlp_out``,
``hook_resid_post`` = the next block's resid_pre; a transcoder's input also ``hook_resid_mid``, ``hook_mlp_in``,
``ln2.hook_normalized``) or attrpatch's (``L3.resid_pre``, ``L3.resid_mid``, ``L3.mlp_in``). A transcoder given
as a safetensors file names both: ``PATH@blocks.3.hook_resid_mid>blocks.3.hook_mlp_out``. sae-lens is not needed.
"""

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from .sites import HookPoint, ModelSpec, _plain

ARCHITECTURES = ("standard", "jumprelu", "topk")
NORMALIZE = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
HOOK_SITES = ("resid_pre", "attn_out", "mlp_out")  # the sites an SAE reads and writes, and a transcoder writes
INPUT_SITES = ("resid_mid", "mlp_in")  # read-only: a transcoder's input (model/dictionary_points.py)
TL_HOOKS = {"hook_resid_pre": "resid_pre", "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out",
            "hook_resid_post": "resid_post", "hook_resid_mid": "resid_mid", "hook_mlp_in": "resid_mid",
            "ln2.hook_normalized": "mlp_in"}
TRANSCODERS = {"transcoder": "standard", "jumprelu_transcoder": "jumprelu", "topk_transcoder": "topk"}
CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"  # sae-lens's file names


@dataclass(frozen=True, kw_only=True)
class Dictionary:
    """One sparse dictionary reading hook point (``site``, ``layer``) and writing (``out_site`` or ``site``,
    ``layer``); weights as in the module docstring."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    site: str
    layer: int
    out_site: str | None = None  # a transcoder's written site; None: an SAE writes what it reads
    architecture: str = "standard"
    threshold: Tensor | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize: str = "none"
    norm_scaling_factor: float = 1.0
    name: str = field(default="", compare=False)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"{self.name or 'dictionary'}: unknown architecture {self.architecture!r}; "
                             f"known: {', '.join(ARCHITECTURES)}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"{self.name}: unknown normalize_activations {self.normalize!r}; known: {', '.join(NORMALIZE)}")
        self._check_sites()
        d_model, d_sae = self.W_enc.shape
        d_out = self.W_dec.shape[-1] if self.out_site else d_model
        shapes = {"W_dec": (self.W_dec, (d_sae, d_out)), "b_enc": (self.b_enc, (d_sae,)),
                  "b_dec": (self.b_dec, (d_out,))}
        if self.threshold is not None:
            shapes["threshold"] = (self.threshold, (d_sae,))
        for key, (t, want) in shapes.items():
            if tuple(t.shape) != want:
                raise ValueError(f"{self.name}: {key} has shape {tuple(t.shape)}; W_enc {(d_model, d_sae)} needs {want}")
        if self.architecture == "jumprelu" and self.threshold is None:
            raise ValueError(f"{self.name}: a jumprelu dictionary needs a 'threshold' tensor [d_sae]")
        if self.architecture == "topk" and not (isinstance(self.k, int) and 0 < self.k <= d_sae):
            raise ValueError(f"{self.name}: a topk dictionary needs k in 1..{d_sae}, got {self.k!r}")

    def _check_sites(self) -> None:
        if self.out_site is None:
            if self.site not in HOOK_SITES:
                raise ValueError(f"{self.name}: an SAE reads one of {', '.join(HOOK_SITES)}, not {self.site!r} "
                                 f"({', '.join(INPUT_SITES)} are a transcoder's inputs: give its written hook too)")
            return
        if self.site not in (*HOOK_SITES, *INPUT_SITES) or self.out_site not in HOOK_SITES:
            raise ValueError(f"{self.name}: a transcoder reads one of {', '.join((*HOOK_SITES, *INPUT_SITES))} and "
                             f"writes one of {', '.join(HOOK_SITES)}; got {self.site!r} -> {self.out_site!r}")
        if self.apply_b_dec_to_input or self.normalize != "none":
            raise ValueError(f"{self.name}: a transcoder neither subtracts b_dec from its input nor normalises it "
                             f"(got apply_b_dec_to_input={self.apply_b_dec_to_input}, normalize={self.normalize!r})")

    @property
    def d_model(self) -> int:
        """The input width d_in."""
        return self.W_enc.shape[0]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def writes(self) -> str:
        """The site the spliced dictionary writes: ``out_site`` for a transcoder, else ``site``."""
        return self.out_site or self.site

    @property
    def slot(self) -> str:
        """The dictionary's place within its layer: ``resid_pre``, or ``resid_mid>mlp_out`` for a transcoder."""
        return self.site if self.out_site is None else f"{self.site}>{self.out_site}"

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def hook(self) -> str:
        """``L3.resid_pre``, or ``L3.resid_mid>mlp_out`` for a transcoder: one name per dictionary of a screen."""
        return f"L{self.layer}.{self.slot}"

    def to(self, device, dtype) -> "Dictionary":
        move = {k: getattr(self, k).to(device=device, dtype=dtype)
                for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold") if getattr(self, k) is not None}
        return replace(self, **move)

    def normalise(self, x: Tensor) -> tuple[Tensor, tuple]:
        """(n, (scale, shift)): the dictionary's input and how decode undoes it. x: [..., d_model]."""
        if self.normalize == "constant_norm_rescale":
            coeff = math.sqrt(self.d_model) / x.norm(dim=-1, keepdim=True)
            return x * coeff, (1 / coeff, 0.0)
        if self.normalize == "layer_norm":
            mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
            return (x - mu) / (std + 1e-5), (std, mu)
        s = self.norm_scaling_factor if self.normalize == "expected_average_only_in" else 1.0
        return x * s, (1 / s, 0.0)

    def encode(self, x: Tensor) -> Tensor:
        """Latents f [..., d_sae] of x [..., d_model] (formulas in the module docstring)."""
        n, _ = self.normalise(x)
        pre = (n - self.b_dec * float(self.apply_b_dec_to_input)) @ self.W_enc + self.b_enc  # [..., d_sae]
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        f = pre.relu()
        return f * (pre > self.threshold) if self.architecture == "jumprelu" else f

    def decode(self, f: Tensor, stats: tuple, ids: Tensor | None = None) -> Tensor:
        """(f @ W_dec + b_dec) * scale + shift: [..., d_sae] -> [..., d_model]; with ``ids`` [k], f holds
        only those latents ([..., k]) and the others are 0."""
        rows = self.W_dec if ids is None else self.W_dec[ids]  # [k, d_model]
        scale, shift = stats
        return (f @ rows + self.b_dec) * scale + shift


def check_fits(d: Dictionary, *, d_model: int, n_layers: int, model: str) -> None:
    """Raise a ValueError when ``d`` cannot read its hook point of ``model`` (width or layer)."""
    for what, width in (("d_in", d.d_model), ("d_out", d.d_out)):
        if width != d_model:
            raise ValueError(f"{d.name}: dictionary width {what}={width} but {model} has d_model={d_model}; "
                             "use a dictionary trained on this model")
    if not 0 <= d.layer < n_layers:
        raise ValueError(f"{d.name}: hook {d.hook} out of range; {model} has layers 0..{n_layers - 1} "
                         "(hook_resid_post of the last layer is not a site)")


def hook_points(spec: ModelSpec, d: Dictionary) -> tuple[HookPoint, HookPoint]:
    """(read, write): where ``d`` reads its input and where it writes; one point for an SAE. resid_mid is the
    input of the family's MLP norm (``Arch.mlp_norm``), mlp_in the MLP module's input."""
    write = spec.hook_point(d.writes, d.layer)
    if d.site in HOOK_SITES:
        return spec.hook_point(d.site, d.layer), write
    path = spec.arch.mlp_norm if d.site == "resid_mid" else spec.arch.mlp_out
    if path is None:
        raise ValueError(f"{d.name}: {spec.name} has no MLP norm in its Arch table (mlp_norm), so no resid_mid; "
                         "use a transcoder reading mlp_in (the MLP's input) instead")
    return HookPoint(spec.module(path, d.layer), "input", _plain), write


def parse_hook(hook: str, name: str = "") -> tuple[str, int]:
    """'blocks.3.hook_resid_pre' or 'L3.resid_pre' -> ('resid_pre', 3); hook_resid_post L -> resid_pre L+1;
    a transcoder's input 'blocks.3.hook_resid_mid' -> ('resid_mid', 3), 'blocks.3.ln2.hook_normalized' -> ('mlp_in', 3)."""
    tl = re.fullmatch(r"blocks\.(\d+)\.((?:ln2\.)?hook_\w+)", hook)
    ours = re.fullmatch(r"L(\d+)\.(\w+)", hook)
    site = TL_HOOKS.get(tl.group(2)) if tl else ours.group(2) if ours else None
    if site not in (*HOOK_SITES, *INPUT_SITES, "resid_post"):
        raise ValueError(f"{name}: unknown hook {hook!r}; give blocks.L.hook_resid_pre | hook_attn_out | "
                         "hook_mlp_out | hook_resid_post (TransformerLens names; a transcoder also reads "
                         "hook_resid_mid | hook_mlp_in | ln2.hook_normalized) or L<layer>.resid_pre | attn_out | "
                         "mlp_out | resid_mid | mlp_in, e.g. --sae PATH@blocks.3.hook_resid_pre")
    layer = int((tl or ours).group(1))
    return ("resid_pre", layer + 1) if site == "resid_post" else (site, layer)


def _hook_of(cfg: dict, key: str = "hook_name") -> str | None:
    return cfg.get(key) or (cfg.get("metadata") or {}).get(key)


def _sites(hook: str, hook_out: str | None, name: str) -> tuple[str, int, str | None]:
    """(read site, layer, written site or None) of a dictionary's hook names; a transcoder's two must share
    a layer."""
    site, layer = parse_hook(hook, name)
    if hook_out is None:
        return site, layer, None
    out_site, out_layer = parse_hook(hook_out, name)
    if out_layer != layer:
        raise ValueError(f"{name}: a transcoder reading layer {layer} ({hook}) writes layer {out_layer} "
                         f"({hook_out}); only transcoders within one layer are supported (no cross-layer transcoders)")
    return site, layer, out_site


def _weights(path: Path, meta: bool) -> dict[str, Tensor]:
    """The tensors of a safetensors file; with ``meta``, empty meta tensors of their shapes (header only)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not meta:
        return load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}


def load_dictionary(source: str | Path, hook: str | None = None, *, meta: bool = False) -> Dictionary:
    """A Dictionary from ``source``: 'PATH' or 'PATH@hook' or, for a transcoder, 'PATH@hook_in>hook_out'
    (module docstring), PATH a sae-lens folder or a safetensors file; ``hook`` overrides the hooks in cfg.json.
    meta: weights as meta tensors of their shapes, nothing read but the file's header (a memory plan)."""
    text = str(source)
    if hook is None and "@" in text:
        text, hook = text.rsplit("@", 1)
    path = Path(text).expanduser()
    if path.is_dir():
        missing = [f for f in (CFG, WEIGHTS) if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"dictionary folder {str(path)!r} lacks {', '.join(missing)}; a sae-lens folder "
                                    f"has {CFG} and {WEIGHTS}")
        cfg, weights = json.loads((path / CFG).read_text()), _weights(path / WEIGHTS, meta)
    elif path.is_file() and path.suffix == ".safetensors":
        cfg, weights = {}, _weights(path, meta)
    else:
        raise FileNotFoundError(f"no dictionary at {str(path)!r}: give a sae-lens folder ({CFG} + {WEIGHTS}) or a "
                                ".safetensors file with W_enc, b_enc, W_dec, b_dec, and its hook as PATH@hook")
    hook, hook_out = (hook.split(">", 1) if ">" in hook else (hook, None)) if hook else \
        (_hook_of(cfg), _hook_of(cfg, "hook_name_out"))
    if hook is None:
        raise ValueError(f"{str(path)!r}: no hook point (no hook_name in {CFG}); give it as {text}@blocks.L.hook_resid_pre")
    site, layer, out_site = _sites(hook, hook_out, str(path))
    if "W_skip" in weights or cfg.get("architecture") == "skip_transcoder":
        raise ValueError(f"{str(path)!r}: a skip transcoder (W_skip) is not supported: its x @ W_skip term is neither "
                         "a latent nor the error term; use a transcoder without a skip connection")
    need = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in weights]
    if need:
        raise ValueError(f"{str(path)!r}: weights lack {', '.join(need)} (found {', '.join(sorted(weights))})")
    architecture = cfg.get("architecture") or ("jumprelu" if "threshold" in weights else "standard")
    architecture = TRANSCODERS.get(architecture, architecture)
    return Dictionary(
        W_enc=weights["W_enc"], b_enc=weights["b_enc"], W_dec=weights["W_dec"], b_dec=weights["b_dec"],
        threshold=weights.get("threshold"), site=site, layer=layer, out_site=out_site, architecture=architecture,
        k=cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k"),
        # sae-lens's default for an SAE; a plain file and a transcoder: no
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", bool(cfg))) and out_site is None,
        normalize=cfg.get("normalize_activations") or "none",
        norm_scaling_factor=float(cfg.get("norm_scaling_factor") or 1.0), name=str(path))


def save_dictionary(d: Dictionary, folder: str | Path, *, model_name: str = "") -> Path:
    """Write ``d`` in sae-lens's saved format (cfg.json + sae_weights.safetensors) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: getattr(d, k).contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if d.threshold is not None:
        weights["threshold"] = d.threshold.contiguous()
    save_file(weights, str(folder / WEIGHTS))
    tl = {site: name for name, site in reversed(TL_HOOKS.items())}  # the first TL name of each site
    cfg = {"architecture": d.architecture, "d_in": d.d_model, "d_sae": d.d_sae, "dtype": "float32",
           "apply_b_dec_to_input": d.apply_b_dec_to_input, "normalize_activations": d.normalize,
           "metadata": {"hook_name": f"blocks.{d.layer}.{tl[d.site]}", "model_name": model_name}}
    if d.out_site is not None:  # sae-lens's TranscoderConfig
        arch = {v: k for k, v in TRANSCODERS.items()}[d.architecture]
        cfg.update(architecture=arch, d_out=d.d_out, hook_name_out=f"blocks.{d.layer}.{tl[d.out_site]}")
    if d.k is not None:
        cfg["k"] = d.k
    (folder / CFG).write_text(json.dumps(cfg, indent=1))
    return folder
