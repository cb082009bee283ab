"""Several corruptions in one run: the comparison of the per-corruption screens (each a whole run of its own
in ``OUT/<corruption>/``), written as corruptions.json and corruptions.md in ``OUT``.

    key_position(report)    the position of the task's key token (a role in KEY_ROLES), or the position whose
                            verified components matter most
    write_corruptions(out, reports)   the comparison: per corruption its baselines, per component x direction
                            the normalised exact effect under each corruption and the corruptions_disagree flag
"""

from pathlib import Path

from ..analysis.flags import CORRUPTIONS_DISAGREE, corruption_comparison
from .files import write_atomic, write_json

KEY_ROLES = ("S2", "subject", "copied")  # IOI's repeated subject, facts' last subject token, induction's copy
MAX_LISTED = 30


def key_position(report: dict) -> int:
    """The first position labelled with a key role; else the one with the largest summed |normalised exact
    effect| (primary metric) over the verified components."""
    for pos, label in enumerate(report.get("tokens") or ()):
        if set(str(label).split("/")) & set(KEY_ROLES):
            return pos
    weight: dict[int, float] = {}
    for e in report["components"]:
        v = e["exact_norm"].get(report["metric"])
        if e["pos"] is not None and v == v and v is not None:
            weight[e["pos"]] = weight.get(e["pos"], 0.0) + abs(v)
    return max(weight, key=weight.get) if weight else 0


def comparison(reports: dict[str, dict]) -> dict:
    """The comparison of the per-corruption reports (label -> report.json dict)."""
    first = next(iter(reports.values()))
    metric = first["metric"]
    return {"corruptions": list(reports), "model": first.get("model"), "task": first.get("task"), "metric": metric,
            "key_position": key_position(first),
            "tokens": first.get("tokens"),
            "baselines": {k: {"clean": r["clean_metric"][metric], "corrupt": r["corrupt_metric"][metric]}
                          for k, r in reports.items()},
            "components": corruption_comparison({k: r["components"] for k, r in reports.items()}, metric)}


def write_corruptions(out: Path, reports: dict[str, dict]) -> dict:
    """corruptions.json and corruptions.md in ``out``; returns the comparison dict."""
    comp = comparison(reports)
    write_json(Path(out) / "corruptions.json", comp)
    labels, metric = comp["corruptions"], comp["metric"]
    lines = [f"# Corruptions compared: {', '.join(labels)}", "",
             f"Each corruption is a whole screen of its own (`{'/`, `'.join(labels)}/`); effects here are exact, "
             f"under {metric}, normalised by that corruption's clean - corrupt gap, for the components verified "
             "under more than one. STR keeps prompts in distribution; Gaussian noise (GN) does not (Zhang & Nanda).",
             "", "| corruption | clean | corrupt | gap |", "|---|---|---|---|"]
    lines += [f"| {k} | {b['clean']:.4g} | {b['corrupt']:.4g} | {b['clean'] - b['corrupt']:.4g} |"
              for k, b in comp["baselines"].items()]
    flagged = [e for e in comp["components"] if CORRUPTIONS_DISAGREE in e["flags"]]
    lines += ["", f"## Where the corruptions disagree ({len(flagged)} of {len(comp['components'])})", "",
              "`corruptions_disagree`: the normalised effect changes sign, or matters (>= 0.1) under one "
              "corruption and is about zero (< 0.05) under another.", ""]
    if flagged:
        lines += ["| component | direction | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
        lines += [f"| {e['name']} | {e['direction']} | " + " | ".join(
            f"{e['exact_norm'].get(k, float('nan')):+.2f}" for k in labels) + " |" for e in flagged[:MAX_LISTED]]
    else:
        lines.append("No verified component changes sign or importance across the corruptions.")
    write_atomic(Path(out) / "corruptions.md", lambda f: f.write("\n".join(lines) + "\n"))
    return comp
