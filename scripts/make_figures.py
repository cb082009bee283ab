"""Regenerate every figure under figures/ from the embedded toy GPT-2 (attrpatch/data/toy-gpt2).

One screen of the IOI task (prompts of one template, so that every prompt has the same tokens at the
same positions), both directions, every default site, all four metrics, every component verified by
exact patching (--top-k all: the cost-vs-recall figure needs the full ground truth), then every figure
of attrpatch.plot, as PNG and PDF. Deterministic: same model, same arguments -> identical files.

Examples:
    python scripts/make_figures.py                       # writes figures/*.png, figures/*.pdf
    python scripts/make_figures.py --run-dir runs/paper  # also keep the screen's report and scores
"""

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import torch  # noqa: E402

from attrpatch import plot  # noqa: E402
from attrpatch.config import DEFAULT_SITES, ScreenConfig  # noqa: E402
from attrpatch.inputs import tasks  # noqa: E402
from attrpatch.inputs.pairs import save_jsonl, tokenize_pair  # noqa: E402
from attrpatch.model.loading import DEFAULT_MODEL, load  # noqa: E402
from attrpatch.model.sites import SITES  # noqa: E402
from attrpatch.pipeline import run_screen  # noqa: E402

FORMATS = ("png", "pdf", "svg")


def _csv(choices):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        if not items or any(t not in choices for t in items):
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return items
    return parse


def _top_k(text: str) -> int | None:
    return None if text == "all" else int(text)


def template_regex(template: str) -> re.Pattern:
    """'When {A} and {B} ...' -> a regex with one named group per placeholder ({S} repeats A or B)."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+?)" for i, p in enumerate(parts))
    return re.compile(pattern + "$")


def ioi_pairs(tokenizer, template: int, n: int, seed: int) -> tuple[list, list[str]]:
    """n held-out IOI pairs of one template, and the position labels: the template's words, with
    the placeholders named ([A], [B], [S], [place], [object])."""
    regex = template_regex(tasks.IOI_TEMPLATES[template])
    pairs, fills = [], []
    for clean, corrupt, answer, wrong in tasks.ioi_texts(200 * n, seed=seed, split="test"):
        m = regex.match(clean)
        if not m:
            continue
        try:
            pair = tokenize_pair(clean, corrupt, answer, wrong, tokenizer, multi_token="refuse")
        except ValueError:
            continue
        if pairs and len(pair.clean_ids) != len(pairs[0].clean_ids):
            continue
        pairs.append(pair)
        fills.append(m)
        if len(pairs) == n:
            break
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} IOI pairs of template {template} tokenise to one length; "
                         f"lower --n-prompts or choose another --template")
    order = sorted(regex.groupindex, key=regex.groupindex.get)  # placeholders in text order
    todo = [(name, fills[0].group(name)) for name in order]
    labels = []
    for tok in (tokenizer.decode([i]) for i in pairs[0].clean_ids):
        if todo and tok.strip() == todo[0][1].strip():
            labels.append(f"[{todo.pop(0)[0]}]")
        else:
            labels.append(tok)
    return pairs, labels


# the stems of the figures this script makes; figures/ also holds others (README, figures/README.md)
OWN_STEMS = ("positions_", "heads_", "scatter_", "metrics_", "cost_recall_", "directions")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded toy GPT-2)")
    p.add_argument("--out", type=Path, default=ROOT / "figures", help="where the figures go")
    p.add_argument("--format", type=_csv(FORMATS), default=("png", "pdf"))
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--template", type=int, default=0, help="index into attrpatch.inputs.tasks.IOI_TEMPLATES")
    p.add_argument("--sites", type=_csv(SITES), default=DEFAULT_SITES)
    p.add_argument("--top-k", type=_top_k, default=None, help="'all' (default) or a number per site")
    p.add_argument("--random-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results are bitwise "
                   "reproducible for a fixed count)")
    p.add_argument("--run-dir", type=Path, default=None, help="keep the screen's files here (default: a "
                   "temporary folder, deleted)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.model is None and not (DEFAULT_MODEL / "config.json").is_file():
        raise SystemExit(f"the embedded model is missing ({DEFAULT_MODEL}); train it with "
                         "`python scripts/train_toy_model.py` or give --model")
    model, tokenizer = load(args.model)
    pairs, labels = ioi_pairs(tokenizer, args.template, args.n_prompts, args.seed)
    config = ScreenConfig(sites=args.sites, direction="both", top_k=args.top_k, random_k=args.random_k,
                          seed=args.seed, progress=False)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="attrpatch-figures-"))
    try:
        task_file = run_dir / f"ioi-template{args.template}.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        save_jsonl(pairs, task_file)
        start = time.perf_counter()
        run_screen(model, tokenizer, task=str(task_file), config=config, out=run_dir,
                   model_name=args.model or f"embedded:{DEFAULT_MODEL.name}", n_prompts=args.n_prompts,
                   figures=False)
        print(f"screened {len(pairs)} IOI pairs in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        run = plot.load_run(run_dir)
        run.report["tokens"] = labels  # the template's words, placeholders named
        args.out.mkdir(parents=True, exist_ok=True)
        for old in sorted(args.out.iterdir()):  # this script's figures of an earlier version (others stay)
            if old.suffix.lstrip(".") in FORMATS and old.stem.startswith(OWN_STEMS):
                old.unlink()
        for stem, fig in plot.figures(run):
            for path in plot.save(fig, args.out / stem, args.format):
                print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    finally:
        if args.run_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
