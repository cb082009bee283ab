"""A feature screen's files (feature_screening.py): features.json (everything), features.csv (one row per
verified latent or error term x direction) and a "Features" section appended to report.md: per dictionary
the agreement of the ranking estimator with exact patching (Pearson with its 95% interval over prompt pairs,
the number flagged), and the top features by |exact effect| with their ids, intervals, flags and measured
causes."""

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
             f"sample, with the dictionary spliced in (y = decode(f) + error). Metric: {metric}; "
             f"ranked by {label}.", ""]
    for direction, per_hook in found["agreement"].items():
        lines += [f"### Agreement ({direction})", ""]
        lines += table(["dictionary", "scored", "latents", "Pearson [95% CI]", "Spearman", "sign", "recall@k",
                        "flagged", "false negatives"],
                       [[hook, a["n_scored"], a["n_latents_scored"], _with_ci(a, "pearson"), num(a["spearman"], 2),
                         num(a["sign_agreement"], 2), f"{num(a['recall_at_k'], 2)} (k={a['k']})",
                         a.get("n_flagged", ""),
                         a["false_negatives"]["verdict"]] for hook, a in per_hook.items()])
        for hook in per_hook:
            rows = [r for r in found["rows"] if r["direction"] == direction and r["hook"] == hook]
            rows = sorted(rows, key=lambda r: -abs(r[f"exact_{metric}"]))[:TOP_ROWS]
            lines += [f"Top features of {hook} by |exact {metric}| ({direction}):", ""]
            lines += table(["feature", label, "exact [95% CI]", f"{label} rank", "chosen", "flags"],
                           [[name(r, tokens), num(r.get("approx", r["atp"])), _exact(r, metric), r["rank_approx"],
                             r["chosen"], ", ".join(r.get("flags", []))] for r in rows])
            causes = [r for r in rows if r.get("causes")]
            lines += [f"- {name(r, tokens)}: " + "; ".join(r["causes"]) for r in causes] + ([""] if causes else [])
    return "\n".join(lines)


def _with_ci(a: dict, stat: str) -> str:
    ci = a.get(f"{stat}_ci")
    return num(a[stat], 2) + ("" if ci is None else f" [{num(ci[0], 2)}, {num(ci[1], 2)}]")


def _exact(r: dict, metric: str) -> str:
    ci = r.get("exact_ci")
    return num(r[f"exact_{metric}"]) + ("" if ci is None else f" [{num(ci[0])}, {num(ci[1])}]")


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
