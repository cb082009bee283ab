"""The clean-run check every report starts with: does the model do the task at all? A screen of a model
that does not measures nothing (docs/methods.md#prompts).

    accuracy           share of pairs whose answer logit beats the wrong one on the clean prompt
    corrupt_accuracy   share whose wrong token beats the answer on the corrupt prompt
    logit_diff         the distribution over pairs of logit[answer] - logit[wrong] on the clean run

Pure: per-pair logit differences in, numbers and warnings out.
"""

from torch import Tensor

MIN_ACCURACY = 0.8  # below this share of solved clean prompts, the report warns


def summary(values: Tensor) -> dict[str, float]:
    """mean, std, min, quartiles and max of a [batch] tensor."""
    v = values.double().flatten()
    q = v.quantile(v.new_tensor([0.25, 0.5, 0.75])).tolist() if len(v) else [float("nan")] * 3
    return {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0, "min": float(v.min()),
            "q25": q[0], "median": q[1], "q75": q[2], "max": float(v.max())}


def clean_run_check(clean_diff: Tensor, corrupt_diff: Tensor) -> dict:
    """clean_diff, corrupt_diff: [batch] logit[answer] - logit[wrong] on each run, one per pair."""
    check = {"n": len(clean_diff), "accuracy": float((clean_diff > 0).double().mean()),
             "corrupt_accuracy": float((corrupt_diff < 0).double().mean()),
             "logit_diff": summary(clean_diff), "corrupt_logit_diff": summary(corrupt_diff),
             "per_pair": clean_diff.double().tolist()}
    check["warnings"] = warnings_for(check)
    return check


def by_group(per_pair: list[float], groups: list[str | None]) -> dict[str, dict]:
    """Accuracy and mean clean logit difference per group (template): {group: {n, accuracy, mean}}."""
    out: dict[str, list[float]] = {}
    for value, group in zip(per_pair, groups):
        out.setdefault(str(group), []).append(value)
    return {g: {"n": len(v), "accuracy": sum(x > 0 for x in v) / len(v), "mean": sum(v) / len(v)}
            for g, v in out.items()}


def warnings_for(check: dict) -> list[str]:
    """Plain-words warnings with the likely causes, or [] when the model does the task."""
    found = []
    gap = check["logit_diff"]["mean"]
    if check["accuracy"] < MIN_ACCURACY or gap <= 0:
        found.append(
            f"the model solves only {check['accuracy']:.0%} of the clean prompts (answer above the wrong "
            f"token; mean logit difference {gap:+.2f}): a screen of a model that does not do the task "
            "measures nothing. Likely causes: a missing BOS token (see --prepend-bos; many models are "
            "off-distribution without it), wrong answer tokens (a leading space, another spelling), or a "
            "model too small for the task. --keep-correct keeps only the pairs the model solves.")
    return found
