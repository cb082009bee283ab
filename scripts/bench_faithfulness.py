#!/usr/bin/env python
"""Time the edges run's faithfulness curve (edge_screening.faithfulness_curve) on the prompts an edges run uses,
and save its values, so that two versions of the curve can be compared on the same prompts and scores.

    python scripts/bench_faithfulness.py --out /tmp/faith.json                 # SmolLM2, 16 IOI pairs (the CLI's)
    python scripts/bench_faithfulness.py --model toy --out /tmp/faith.json     # the embedded toy GPT-2

The scores are EAP's (denoising, logit difference), as `attrpatch edges --direction both` ranks by. The
json holds the sizes, the faithfulness, the seconds of the curve, the forward-equivalents it counted and
the load average at the start and the end.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import attrpatch as ap  # noqa: E402
from attrpatch.edge_screening import EdgeConfig, faithfulness_curve  # noqa: E402
from attrpatch.inputs.batch import make_batch  # noqa: E402
from attrpatch.methods.edges.eap import attribute_edges  # noqa: E402
from attrpatch.prompts import pad_token, prepare_pairs  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (the fetched folder), toy, or a folder")
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--circuit-points", type=int, default=12)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    name = ap.fetch("smollm2") if args.model == "smollm2" else None if args.model == "toy" else args.model
    model, tokenizer = ap.load(name)
    config = EdgeConfig(circuit_points=args.circuit_points)
    pairs, _ = prepare_pairs(model, tokenizer, task="ioi", n_prompts=args.n_prompts, seed=config.seed)
    batch = make_batch(pairs, pad_id=pad_token(tokenizer))
    scores = attribute_edges(model, batch, metrics=config.metrics, direction="denoise")
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    curve = faithfulness_curve(model, batch, scores, config)
    found = {"model": str(name or "toy"), "n_prompts": batch.n, "n_pos": batch.n_pos, "sizes": curve["sizes"],
             "faithfulness": curve["faithfulness"], "seconds": time.perf_counter() - start,
             "cpu_seconds": time.process_time() - cpu, "forward_equivalents": curve["forward_equivalents"],
             "load_start": load, "load_end": os.getloadavg()[0], "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps(found, indent=1))
    print(json.dumps(found))
    return found


if __name__ == "__main__":
    main()
