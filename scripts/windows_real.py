"""Sliding windows on a real model, two corruptions: SmolLM2-135M-Instruct, built-in factual recall.

The MLP outputs at the last subject token, windows of 1 and 5 layers centred on each layer, denoising
(restore the clean value into the corrupted run), under Gaussian noise on the subject's embeddings (GN,
causal tracing, std 3x the embeddings') and symmetric token replacement (STR, another subject of as many
words). Exact effects (one joint patch per window) and AtP (the sum over the window), every metric
including the discrete ones. Writes figures/windows_facts.{json,png,pdf} and prints a summary.

    PYTHONPATH=. OMP_NUM_THREADS=1 python3 scripts/windows_real.py [--pairs 16] [--device cpu]

    PYTHONPATH=. python3 scripts/windows_real.py --replot   # redraw the figure from figures/windows_facts.json

Pairs: one template, one layout (the subject's last token at one position), BOS as the tokenizer adds it,
only pairs the model solves on the clean prompt (--keep-correct). Needs the model folder
~/.cache/attrpatch/smollm2-135m-instruct (a plain HF folder).
"""

import argparse
import json
import time
from pathlib import Path

import torch

import attrpatch as ap
from attrpatch.inputs.corruption import with_embedding_noise
from attrpatch.methods.patching.windows import sweep_windows
from attrpatch.plot.style import save
from attrpatch.plot.windows import normalised, plot_windows
from attrpatch.prompts import prepare_pairs

MODEL = Path.home() / ".cache/attrpatch/smollm2-135m-instruct"
METRICS = ("logit_diff", "prob", "rank", "accuracy")
WIDTHS = (1, 5)


def summary(sweeps: dict) -> list[str]:
    """Per corruption and width: the clean-corrupt gap, and the peak of the normalised exact effect and AtP."""
    lines = []
    for label, sweep in sweeps.items():
        gap = sweep["clean_metric"]["logit_diff"] - sweep["corrupt_metric"]["logit_diff"]
        lines.append(f"{label}: clean logit diff {sweep['clean_metric']['logit_diff']:.3f}, corrupt "
                     f"{sweep['corrupt_metric']['logit_diff']:.3f} (gap {gap:.3f})")
        for w in WIDTHS:
            exact = normalised(sweep, "exact", w, "logit_diff")
            atp = normalised(sweep, "atp", w, "logit_diff")
            peak = max(range(len(exact)), key=lambda i: exact[i])
            acc = [row[sweep["metrics"].index("accuracy")] for row in sweep["exact"][str(w)]]
            lines.append(f"  window {w}: exact peak {exact[peak]:.3f} at layer {peak}, AtP there {atp[peak]:.3f}; "
                         f"AtP peak {max(atp):.3f} at layer {atp.index(max(atp))}; "
                         f"exact layers 0-5 {', '.join(f'{v:.2f}' for v in exact[:6])}; "
                         f"accuracy gain at the peak {acc[peak]:+.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="figures/windows_facts")
    parser.add_argument("--replot", action="store_true", help="redraw OUT.png/.pdf from OUT.json, no model run")
    args = parser.parse_args()
    out = Path(args.out)
    if args.replot:
        sweeps = {label: {"model": MODEL.name, "task": "facts"} | sweep
                  for label, sweep in json.loads(out.with_suffix(".json").read_text()).items()}
        out.with_suffix(".json").write_text(json.dumps(sweeps, indent=1) + "\n")
        save(plot_windows(sweeps), out, ("png", "pdf"))
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval().to(args.device)
    pairs, record = prepare_pairs(model, tokenizer, task="facts", n_prompts=args.pairs, per_position=True,
                                  keep_correct=True)
    subject = pairs[0].role_positions["subject"]
    batch = ap.make_batch(pairs, pad_id=tokenizer.pad_token_id or 0)
    embedding = model.get_input_embeddings().weight.detach().cpu()
    batches = {"GN": with_embedding_noise(batch, embedding, 3.0, seed=0), "STR": batch}
    sweeps, start = {}, time.perf_counter()
    for label, b in batches.items():
        sweeps[label] = sweep_windows(model, b, site="mlp_out", widths=WIDTHS, pos=subject, metrics=METRICS,
                                      direction="denoise").to_dict() | {"pos_label": "last subject token",
                                                                       "model": MODEL.name, "task": "facts"}
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(sweeps, indent=1) + "\n")
    save(plot_windows(sweeps), out, ("png", "pdf"))
    print(f"{len(pairs)} pairs x {batch.n_pos} tokens (template {record['template']!r}, "
          f"{record['dropped_unsolved']} unsolved dropped), e.g. {pairs[0].clean!r} -> {pairs[0].answer!r} "
          f"vs {pairs[0].corrupt!r} -> {pairs[0].wrong!r}; subject token at position {subject}; {seconds:.0f} s")
    print("\n".join(summary(sweeps)))


if __name__ == "__main__":
    main()
