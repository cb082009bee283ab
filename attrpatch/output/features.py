"""A feature screen's files (feature_screening.py): features.json (everything), features.csv (one row per
verified latent or error term x direction) and a "Features" section appended to report.md: per dictionary
the agreement of AtP with exact patching, and the top features by |exact effect| with their ids."""

from pathlib import Path

from .files import write_atomic, write_csv, write_json
from .markdown import name, num, table

TOP_ROWS = 10  # features listed per dictionary and direction in report.md


def features_markdown(found: dict, tokens: list | None = None) -> str:
    """The report.md section of a feature screen dict (FeatureResult.to_dict())."""
    metric, est = found["metric"], found.get("estimator", "atp")
    label = "AtP" if est == "atp" else est
    lines = ["## Features", "",
             f"Dictionary latents (`L<layer>F<id>@<pos>`) and error terms (`L<layer>.sae_error@<pos>`) screened like "
             f"the other sites: AtP from the same backward, exact patching of the top-k and a random control "
             f"sample, with the dictionary spliced in (y = decode(f) + error). Metric: {metric}; ranked by {label}.", ""]
    for direction, per_hook in found["agreement"].items():
        lines += [f"### Agreement ({direction})", ""]
        lines += table(["dictionary", "scored", "latents", "Pearson", "Spearman", "sign", "recall@k", "false negatives"],
                       [[hook, a["n_scored"], a["n_latents_scored"], num(a["pearson"], 2), num(a["spearman"], 2),
                         num(a["sign_agreement"], 2), f"{num(a['recall_at_k'], 2)} (k={a['k']})",
                         a["false_negatives"]["verdict"]] for hook, a in per_hook.items()])
        for hook in per_hook:
            rows = [r for r in found["rows"] if r["direction"] == direction and r["hook"] == hook]
            rows = sorted(rows, key=lambda r: -abs(r[f"exact_{metric}"]))[:TOP_ROWS]
            lines += [f"Top features of {hook} by |exact {metric}| ({direction}):", ""]
            lines += table(["feature", label, "exact", f"{label} rank", "chosen"],
                           [[name(r, tokens), num(r.get("approx", r["atp"])), num(r[f"exact_{metric}"]),
                             r["rank_approx"], r["chosen"]] for r in rows])
    return "\n".join(lines)


def write_features(out: Path, found: dict, tokens: list | None = None) -> str:
    """Write features.json and features.csv into ``out`` and append the section to out/report.md (when there
    is one); returns the section."""
    out = Path(out)
    write_json(out / "features.json", {**found, "tokens": tokens})
    write_csv(out / "features.csv", found["rows"])
    section = features_markdown(found, tokens)
    report = out / "report.md"
    if report.is_file():
        text = report.read_text()
        text = text.split("\n## Features\n")[0].rstrip("\n")  # a rerun replaces the section
        write_atomic(report, lambda f: f.write(text + "\n\n" + section + "\n"))
    return section
