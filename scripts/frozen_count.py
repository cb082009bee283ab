"""Count the forward-equivalents of the default screen's frozen step (issue 27) by kind, from its ``passes``:
the runs it made (source and receiving, a forward each), the RelP attributions (a forward each, a backward
as steps.BACKWARD_EQUIVALENTS) and the patched copies (exact patching's count). Counts, not timings: they
do not move with the machine's load.

    python scripts/frozen_count.py                      # SmolLM2-135M, IOI, 16 pairs, both directions
    python scripts/frozen_count.py --out counts.json    # also the counts and the whole report.json
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

import attrpatch.steps as steps
from attrpatch.config import ScreenConfig
from attrpatch.model.fetch import fetch
from attrpatch.model.loading import load
from attrpatch.pipeline import run_screen


def counted(measure, calls: list):
    """``measure`` (steps.frozen_measurements) appending each call's forward-equivalents by kind to ``calls``."""
    def call(*args, **kwargs):
        found, passes = measure(*args, **kwargs)
        calls.append({"direction": kwargs["direction"], "components": len(args[2]),
                      "norm_freeze": sum("norm" in v for v in found.values()), "runs": passes["runs"],
                      "attributions": passes["forward"] + steps.BACKWARD_EQUIVALENTS * passes["backward"],
                      "attribution_forwards": passes["forward"], "attribution_backwards": passes["backward"],
                      "patched": passes["forward_equivalents"] - passes["runs"],
                      "patched_rows": passes["patched_rows"]})
        return found, passes
    return call


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model folder (default: attrpatch fetch smollm2's)")
    p.add_argument("--n-prompts", type=int, default=16, help="IOI pairs (default 16, the CLI's)")
    p.add_argument("--out", help="write the counts and the screen's report.json here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load(args.model or str(fetch("smollm2")))
    calls: list = []
    real, steps.frozen_measurements = steps.frozen_measurements, counted(steps.frozen_measurements, calls)
    try:
        with tempfile.TemporaryDirectory() as out:
            run_screen(model, tokenizer, task="ioi", config=ScreenConfig(direction="both", progress=False), out=out,
                       model_name="smollm2", n_prompts=args.n_prompts, figures=False)
            report = json.loads((Path(out) / "report.json").read_text())
    finally:
        steps.frozen_measurements = real
    total = {k: sum(c[k] for c in calls) for k in ("runs", "attributions", "patched")}
    counts = {"calls": calls, "total": total, "frozen_forward_equivalents": sum(total.values())}
    print(json.dumps(counts, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({**counts, "report": report}, indent=1))
    return counts


if __name__ == "__main__":
    main()
