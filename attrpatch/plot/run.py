"""A screen run read back from its files (report.json, scores.safetensors), and the accessors the figures
share: component values, names, position labels, the default direction and metric."""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..analysis.flags import LABELLED_FLAGS
from ..model.sites import HEAD_LIKE, RESID_LIKE
from .style import _DIR_WORD, ESTIMATOR_LABELS, METRIC_LABELS, STYLE


RESID_SITES = tuple(s for s in RESID_LIKE if s != "embed")  # the sites of the positions heatmap
HEAD_SITES = HEAD_LIKE
DISAGREE = LABELLED_FLAGS


@dataclass
class Run:
    """A screen run's report dict and its AtP scores (numpy, [layer, pos, (unit)], mean over prompts)."""

    report: dict
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None

    @property
    def directions(self) -> list[str]:
        return list(self.report["directions"])

    @property
    def sites(self) -> list[str]:
        return list(self.report["sites"])

    @property
    def metric(self) -> str:
        return self.report["metric"]

    @property
    def estimator(self) -> str:
        """The estimator that ranked, flagged and filled ``approx`` (the first of ``estimators``)."""
        return self.estimators[0]

    @property
    def estimators(self) -> list[str]:
        """Estimators whose scores the components carry (``approx_estimators``), the ranking one first."""
        for c in self.report["components"]:
            if c.get("approx_estimators"):
                return list(c["approx_estimators"])
        est = self.report.get("estimator") or "atp"
        return ["atp" if est == "all" else est]

    @property
    def est_label(self) -> str:
        return ESTIMATOR_LABELS.get(self.estimator, self.estimator)

    def per_position(self, site: str) -> bool:
        return self.report["positions"].get(site) == "each"

    def components(self, direction: str, site: str | None = None) -> list[dict]:
        return [c for c in self.report["components"]
                if c["direction"] == direction and (site is None or c["site"] == site)]

    def score(self, direction: str, metric: str, site: str) -> np.ndarray:
        """AtP scores per position: [layer, pos] or [layer, pos, unit]."""
        name = f"{direction}/{metric}/{site}"
        if name not in self.scores:
            raise KeyError(f"no AtP scores {name!r} in this run (have: {', '.join(sorted(self.scores))})")
        return self.scores[name]

    def n_components(self, site: str) -> int:
        """How many components the site has in this run (what exhaustive patching would verify)."""
        t = self.score(self.directions[0], self.metric, site)
        return t.shape[0] * (t.shape[1] if self.per_position(site) else 1) * (t.shape[2] if t.ndim > 2 else 1)


def load_run(run_dir: str | Path) -> Run:
    """Read report.json and, when present, scores.safetensors of a screen run."""
    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} not found: give the output folder of `attrpatch screen`")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    scores = {}
    if (run_dir / "scores.safetensors").is_file():
        from ..output.report import load_scores

        tensors, axes = load_scores(run_dir / "scores.safetensors")
        for name, t in tensors.items():
            a = t.float().numpy()
            scores[name] = a.mean(0) if axes.get(name, "").startswith("batch ") else a
    return Run(report=report, scores=scores, path=run_dir)


def _as_run(run) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _approx(c: dict, metric: str) -> float:
    return _num(c["approx_metrics"].get(metric))


def _exact(c: dict, metric: str) -> float:
    return _num(c["exact_metrics"].get(metric))


def _short(c: dict) -> str:
    """Component name without the site suffix that a panel title already gives (L2.resid_pre@4 -> L2@4)."""
    return c["name"].replace(f".{c['site']}", "") if c["site"] in RESID_SITES else c["name"]


def _token(text: str, limit: int = 12) -> str:
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    text = text.strip() or repr(text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def position_labels(run: Run) -> list[str]:
    """Position-axis labels: the run's tokens (first clean prompt), else the position numbers."""
    tokens = run.report.get("tokens")
    n = run.report["n_pos"]
    if not tokens or len(tokens) != n:
        return [str(i) for i in range(n)]
    return [_token(t) for t in tokens]


def figure_title(run: Run, direction: str | None, metric: str | None, width: float | None = None) -> str:
    """What a figure shows, for its title: model, task, direction, metric ('smollm2-135m-instruct, ioi:
    denoising, logit diff'). ``direction`` None: both; ``metric`` None: every metric, normalised."""
    return report_title(run.report, direction, metric, width)


def report_title(report: dict, direction: str | None, metric: str | None, width: float | None = None) -> str:
    """:func:`figure_title` from any dict with ``model`` and ``task`` (an edge screen's report.json, a windows
    sweep, a corruption comparison)."""
    model = str(report.get("model") or "model").rstrip("/")
    model = model.split(":", 1)[-1] if model.startswith("embedded:") else Path(model).name or model
    way = "denoising vs noising" if direction is None else _DIR_WORD[direction]
    what = "every metric, normalised" if metric is None else METRIC_LABELS.get(metric, metric)
    task = str(report.get("task") or "task")
    task = Path(task).stem if task.endswith((".jsonl", ".json")) else task  # a task file: its name, not its folder
    text = f"{model}, {task}: {way}, {what}"
    fits = width is None or len(text) * 0.6 * STYLE["figure.titlesize"] <= width * 72  # DejaVu Sans ~0.6 em
    return text if fits else text.replace(": ", ":\n", 1)  # a single column: model and task over the rest


def suptitle(fig, report: dict, direction: str | None, metric: str | None) -> None:
    """Put :func:`report_title` above a figure the plot function made (not into a caller's axes)."""
    fig.suptitle(report_title(report, direction, metric, fig.get_figwidth()), fontsize=STYLE["figure.titlesize"])


def title(fig, run: Run, direction: str | None, metric: str | None) -> None:
    """Put :func:`figure_title` above a figure the plot function made (not into a caller's axes)."""
    suptitle(fig, run.report, direction, metric)


def titled(fig, run: Run, direction: str | None, metric: str | None) -> dict:
    """The figure legend's keywords that make :func:`figure_title` its title (a suptitle and a legend
    outside the top would overlap under constrained layout)."""
    return {"title": figure_title(run, direction, metric, fig.get_figwidth()), "title_fontproperties": {"size": STYLE["figure.titlesize"]}}


def _default(run: Run, direction, metric):
    direction = direction or run.directions[0]
    if direction not in run.directions:
        raise ValueError(f"direction {direction!r} not in this run ({', '.join(run.directions)})")
    metric = metric or run.metric
    if metric not in run.report["metrics"]:
        raise ValueError(f"metric {metric!r} not in this run ({', '.join(run.report['metrics'])})")
    return direction, metric
