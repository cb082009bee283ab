"""Train a small TopK SAE on SmolLM2-135M-Instruct's residual stream at one layer, on the CPU in minutes, and
save it in sae-lens's format, cached like the model:

    <cache>/sae-smollm2-135m-L<layer>-topk<k>-<d_sae>/   cfg.json, sae_weights.safetensors, training.json

(<cache>: $ATTRPATCH_CACHE or ~/.cache/attrpatch). Text, all offline: the *train* split of the built-in
ioi and facts tasks (clean and corrupt prompts with their answers; a screen draws its prompts from the test
split, so no screened prompt is trained on), and the docstrings of Python's standard library (English
prose about programs; no download). The first token of each text is left out of training (its residual
norm is tens of times the others': an attention sink), so the error term carries it at screen time.

The SAE (model/dictionaries.py, architecture topk):
    f = TopK_k(relu((x * c - b_dec) @ W_enc + b_enc)),  x_hat = (f @ W_dec + b_dec) / c
c scales the activations to mean squared norm d_model during training; it is folded into the saved weights
(W_enc * c, W_dec / c, b_dec / c), so the saved dictionary reads raw activations. Loss: squared error; Adam;
decoder rows renormalised to unit norm after each step. Printed and saved in training.json, on held-out
activations (every tenth text): fraction of variance explained (1 - sum |x - x_hat|^2 / sum |x - mean|^2)
and L0 (mean active latents per token).

    OMP_NUM_THREADS=1 python scripts/train_sae.py                  # layer 6, 2048 latents, k 32
    OMP_NUM_THREADS=1 python scripts/train_sae.py --layer 10 --steps 2000
    OMP_NUM_THREADS=1 python scripts/train_sae.py --transcoder     # a transcoder: mlp_in -> mlp_out

--transcoder trains a TopK transcoder instead (model/dictionaries.py): it reads layer L's MLP input (after
its norm, ``mlp_in``) and predicts the MLP's output (``mlp_out``),
    f = TopK_k(relu((x * c_in) @ W_enc + b_enc)),  y_hat = (f @ W_dec + b_dec) / c_out
(no b_dec on the input), c_in and c_out folded into the saved weights; FVE is of y. Cached as
<cache>/transcoder-smollm2-135m-L<layer>-topk<k>-<d_sae>/.
"""

import argparse
import inspect
import json
import math
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attrpatch as ap  # noqa: E402
from attrpatch.engine.hooks import hooked  # noqa: E402
from attrpatch.inputs import tasks  # noqa: E402
from attrpatch.model.dictionaries import Dictionary, save_dictionary  # noqa: E402
from attrpatch.model.fetch import default_cache_dir, fetch  # noqa: E402

STDLIB = ("collections", "itertools", "functools", "json", "re", "string", "textwrap", "random", "statistics",
          "datetime", "pathlib", "os", "shutil", "subprocess", "argparse", "logging", "unittest", "csv",
          "decimal", "fractions", "heapq", "bisect", "typing", "dataclasses", "enum", "contextlib", "inspect",
          "threading", "queue", "socket", "email", "html", "urllib.parse", "zipfile", "tarfile", "calendar")
MAX_TOKENS = 64  # per text


def texts(n_task: int, seed: int) -> list[str]:
    """The training texts (module docstring): task prompts with answers, and stdlib docstrings."""
    found = []
    for clean, corrupt, answer, wrong in tasks.ioi_texts(n_task, seed, split="train") + \
            tasks.facts_texts(n_task, seed, split="train"):
        found += [clean + answer, corrupt + wrong]
    import importlib
    for name in STDLIB:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) and getattr(obj, "__module__", None) == name else None
            if doc and len(doc) > 80:
                found += [p for p in doc.split("\n\n") if len(p) > 80]
    return found


class Stop(Exception):
    """Raised by the hook: nothing after the hooked layer is needed."""


def activations(model, tokenizer, layer: int, texts: list[str],
                transcoder: bool = False) -> tuple[torch.Tensor, list[int]]:
    """resid_pre at ``layer`` of every token but each text's first: ([tokens, d_model], text index per token);
    a transcoder's: the MLP's input and output side by side, [tokens, 2 * d_model]."""
    spec = ap.model_spec(model)
    point = spec.hook_point("mlp_out" if transcoder else "resid_pre", layer)
    rows, owner, inputs = [], [], []

    def grab(raw):
        rows.append(torch.cat([*inputs, raw[0, 1:].detach().clone()], -1))
        inputs.clear()
        raise Stop
    hooks = [(point, grab)]
    if transcoder:  # the MLP module's input: a pre-hook on mlp_out's module
        from attrpatch.model.sites import HookPoint, _plain
        hooks.insert(0, (HookPoint(point.module, "input", _plain), lambda raw: inputs.append(raw[0, 1:].clone())))
    with torch.no_grad(), hooked(hooks):
        for i, text in enumerate(texts):
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :MAX_TOKENS]
            if ids.shape[1] < 2:
                continue
            try:
                model(input_ids=ids)
            except Stop:
                owner += [i] * (ids.shape[1] - 1)
    return torch.cat(rows), owner


def _scale(x: torch.Tensor) -> float:
    return math.sqrt(x.shape[1] / float(x.pow(2).sum(1).mean()))  # E |x c|^2 = d_model


def train(x: torch.Tensor, d_sae: int, k: int, steps: int, batch: int, lr: float, seed: int,
          y: torch.Tensor | None = None) -> Dictionary:
    """A TopK SAE trained on x [tokens, d_model] (module docstring), the scale folded into its weights; with
    ``y`` [tokens, d_model], a transcoder from x to y."""
    g = torch.Generator().manual_seed(seed)
    d_model = x.shape[1]
    c = _scale(x)
    c_out = c if y is None else _scale(y)
    xs, ys = x * c, (x * c if y is None else y * c_out)
    W_dec = torch.randn(d_sae, d_model, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec, "b_dec": ys.mean(0)}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    on_input = float(y is None)  # an SAE subtracts b_dec from its input, a transcoder does not
    for step in range(steps):
        pick = torch.randint(len(xs), (batch,), generator=g)
        rows, targets = xs[pick], ys[pick]
        pre = (rows - params["b_dec"] * on_input) @ params["W_enc"] + params["b_enc"]
        top = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        loss = (f @ params["W_dec"] + params["b_dec"] - targets).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step}: loss {float(loss.detach()) / d_model:.4f} per dimension", flush=True)
    p = {key: t.detach() for key, t in params.items()}
    where = {"site": "resid_pre"} if y is None else {"site": "mlp_in", "out_site": "mlp_out"}
    return Dictionary(W_enc=p["W_enc"] * c, b_enc=p["b_enc"], W_dec=p["W_dec"] / c_out, b_dec=p["b_dec"] / c_out,
                      layer=0, architecture="topk", k=k, apply_b_dec_to_input=y is None, **where)


def quality(d: Dictionary, x: torch.Tensor, y: torch.Tensor | None = None) -> dict:
    """Fraction of variance explained (of y for a transcoder) and L0 of ``d`` on x [tokens, d_model]."""
    y = x if y is None else y
    with torch.no_grad():
        f = d.encode(x)
        recon = d.decode(f, (1.0, 0.0))
    fve = 1 - float((y - recon).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    return {"fraction_variance_explained": fve, "l0": float(f.ne(0).sum(1).float().mean()), "tokens": len(x)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-task", type=int, default=400, help="prompts drawn per task (ioi, facts), train split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--force", action="store_true", help="retrain even when the cached SAE exists")
    p.add_argument("--transcoder", action="store_true", help="a transcoder from the MLP's input to its output")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    cache = Path(args.cache or default_cache_dir()).expanduser()
    kind = "transcoder" if args.transcoder else "sae"
    folder = cache / f"{kind}-smollm2-135m-L{args.layer}-topk{args.k}-{args.d_sae}"
    if (folder / "cfg.json").is_file() and not args.force:
        print(folder)
        print((folder / "training.json").read_text())
        return 0
    model, tokenizer = ap.load(fetch("smollm2", args.cache))
    found = texts(args.n_task, args.seed)
    x, owner = activations(model, tokenizer, args.layer, found, args.transcoder)
    x, y = x.chunk(2, -1) if args.transcoder else (x, None)  # a transcoder's input and output
    held = torch.tensor([o % 10 == 0 for o in owner])
    print(f"{len(found)} texts, {len(x)} tokens ({int(held.sum())} held out)", flush=True)
    d = train(x[~held], args.d_sae, args.k, args.steps, args.batch, args.lr, args.seed,
              None if y is None else y[~held])
    d = replace(d, layer=args.layer)
    stats = {**quality(d, x[held], None if y is None else y[held]),
             "train": quality(d, x[~held], None if y is None else y[~held]), "layer": args.layer,
             "d_sae": args.d_sae, "k": args.k, "steps": args.steps, "texts": len(found), "kind": kind}
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{kind}-"))  # atomic: written aside, then renamed
    save_dictionary(d, tmp, model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp / "training.json").write_text(json.dumps(stats, indent=1))
    tmp.chmod(0o755)  # mkdtemp's 700: readable like the model's folder
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    print(folder)
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
