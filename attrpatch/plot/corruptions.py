"""Several corruptions compared (Zhang & Nanda's figure): per site, the normalised exact effect by layer at the
key token, one line per corruption, drawn from ``OUT/corruptions.json`` alone (output/corruptions.py).
Only verified components are drawn (markers); flagged ``corruptions_disagree`` ones are ringed."""

import json
from pathlib import Path

from .run import suptitle
from .style import DOUBLE, FLAG_C, METRIC_LABELS, PALETTE, SINGLE, _panels, _style


def load_comparison(path) -> dict:
    path = Path(path)
    return json.loads((path / "corruptions.json" if path.is_dir() else path).read_text())


def key_lines(comp: dict, site: str, direction: str) -> dict[str, list[tuple[int, float, bool]]]:
    """Per corruption, (layer, normalised effect, flagged) of ``site`` at the key position, by layer."""
    lines: dict[str, list] = {k: [] for k in comp["corruptions"]}
    for e in comp["components"]:
        if e["site"] == site and e["pos"] == comp["key_position"] and e["direction"] == direction:
            for label, v in e["exact_norm"].items():
                lines[label].append((e["layer"], v, "corruptions_disagree" in e["flags"]))
    return {k: sorted(v) for k, v in lines.items()}


def plot_corruptions(comp, direction: str = "denoise", *, ax=None, fig=None):
    """One panel per site with components at the key position; x: layer, y: normalised exact effect,
    ``ax.lines[j]``: corruption j. A figure of its own is titled with the model, task, direction and metric."""
    comp = comp if isinstance(comp, dict) else load_comparison(comp)
    own = ax is None
    sites = [s for s in dict.fromkeys(e["site"] for e in comp["components"])
             if any(key_lines(comp, s, direction).values())]
    if not sites:
        raise ValueError(f"no component at the key position {comp['key_position']} was verified under two "
                         f"corruptions in direction {direction!r}; screen per position (--positions each) "
                         "with a larger --top-k")
    tokens = comp.get("tokens") or []
    where = tokens[comp["key_position"]] if comp["key_position"] < len(tokens) else comp["key_position"]
    with _style():
        fig, axes = _panels(len(sites), ax, fig, (DOUBLE if len(sites) > 1 else SINGLE, 2.2), sharey=True)
        for a, site in zip(axes, sites):
            for j, (label, points) in enumerate(key_lines(comp, site, direction).items()):
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                a.plot(xs, ys, color=PALETTE[j % len(PALETTE)], marker="o", markersize=2.5, label=label)
                flagged = [(x, y) for x, y, f in points if f]
                a.scatter([x for x, _ in flagged], [y for _, y in flagged], s=30, facecolors="none",
                          edgecolors=FLAG_C, linewidths=0.8, zorder=3)
            a.axhline(0, color="#777777", linewidth=0.5, zorder=0)
            a.set_title(f"{site} at {where}")
            a.set_xlabel("layer")
        axes[0].set_ylabel(f"{METRIC_LABELS.get(comp['metric'], comp['metric'])} effect / (clean - corrupt)")
        axes[-1].legend(loc="best")
        if own and comp.get("model"):  # comparisons written before they named it: no title
            suptitle(fig, comp, direction, comp["metric"])
    return fig
