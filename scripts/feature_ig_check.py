"""IG of dictionary latents along each dictionary's own line (methods/estimators/feature_ig.py) against AtP
and exact patching, on the prompts of a finished screen: per dictionary, Pearson with exact over the top 10
latents or error terms by |AtP|, their sums, and IG's completeness (every latent + error vs the exact patch of
the point the dictionary writes, all positions).

    OMP_NUM_THREADS=1 python scripts/feature_ig_check.py runs/smollm2-two-dictionaries SAE [SAE ...] [--steps 8]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attrpatch as ap  # noqa: E402
from attrpatch.methods.estimators.feature_ig import feature_ig  # noqa: E402
from attrpatch.methods.patching.features import patch_features  # noqa: E402


def prompts(run: Path):
    """The screen's prompt pairs, exactly as it ran them (manifest.json)."""
    from types import SimpleNamespace
    found = json.loads((run / "manifest.json").read_text())
    return ap.make_batch([SimpleNamespace(clean_ids=p["clean_ids"], corrupt_ids=p["corrupt_ids"],
                                          answer_id=p["answer_id"], wrong_id=p["wrong_id"]) for p in found["prompts"]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("dictionaries", nargs="+")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    found = json.loads((args.run / "manifest.json").read_text())
    model, _ = ap.load(found.get("model_path") or found["model"])
    batch = prompts(args.run)
    for path in args.dictionaries:
        d = ap.load_dictionary(path)
        atp = ap.attribute(model, batch, sites=[], dictionaries=[d]).features
        comps = atp.components("logit_diff")
        order = torch.tensor([abs(atp.score(c, "logit_diff")) for c in comps]).argsort(descending=True)[:10]
        top = [comps[i] for i in order.tolist()]
        start = time.time()
        ig = feature_ig(model, batch, [d], steps=args.steps)
        seconds = time.time() - start
        exact = patch_features(model, batch, [d], top).values[:, 0].double()
        a, i = (torch.tensor([s.score(c, "logit_diff") for c in top]).double() for s in (atp, ig))
        whole = float(ap.patch(model, batch, [ap.Component(d.writes, d.layer, None)]).values[0, 0])
        total = float(ig.values["logit_diff"][d.hook].sum() + ig.error["logit_diff"][d.hook].sum())
        pearson = [float(torch.corrcoef(torch.stack([x, exact]))[0, 1]) for x in (a, i)]
        print(f"{d.hook}: top 10 by |AtP|: Pearson with exact AtP {pearson[0]:+.3f}, IG {pearson[1]:+.3f}; sums AtP "
              f"{a.sum():+.3f}, IG {i.sum():+.3f}, exact {exact.sum():+.3f}; every latent + error by IG {total:+.3f} "
              f"vs the exact patch of {d.writes} {whole:+.3f}; IG took {seconds:.1f} s ({args.steps} steps)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
