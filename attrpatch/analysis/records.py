"""What flows between the screen's stages, typed: a site's verification plan (``SitePlan``), one verified
component's or edge's result (``Finding``), and the screen's tally of what it ran (``Cost``). The node and
edge screens share them; report.json, results.csv and report.md see only their dicts (``Finding.to_dict``,
``Cost.to_dict``), made at the output boundary. Pure data: no model here.
"""

from dataclasses import dataclass, field

from torch import Tensor

from ..methods.edges.graph import Edge
from ..model.sites import Component

# report.json's keys of one finding, in its order: a node screen's component, an edge screen's edge
NODE_KEYS = ("direction", "site", "layer", "head", "neuron", "pos", "name", "selected", "approx", "exact",
             "exact_ci", "approx_estimators", "approx_metrics", "exact_metrics", "exact_norm", "rank_approx",
             "rank_exact", "flags", "evidence", "causes")
EDGE_KEYS = ("sender", "receiver", "name", "direction", "selected", "approx", "exact", "exact_ci", "rank_approx",
             "rank_exact", "flags", "approx_metrics", "exact_metrics", "exact_norm", "evidence", "causes")


@dataclass(frozen=True)
class SitePlan:
    """What one site verifies and why (the edge screen: its edges, as one site). ``all``: every component of
    the site (``model.sites.components`` order), or every edge (``EdgeGraph.edges`` order); ``approx``: the ranking estimator's scores per graded metric, [component]; ``by_estimator``:
    every estimator's; ``tops``: each estimator's top-k by |score| under the primary metric (all of them when
    top_k is None: the exhaustive sweep); ``top``: their union, the ranking estimator's order first;
    ``control``: the seeded uniform sample of the rest (what the top-k missed); ``rank_approx``: each
    component's rank under the ranking estimator. ``mode``: how the top list was chosen: "top-k",
    "adaptive" (grown past the top-k by analysis/ranking.extend) or "exhaustive" (every component that can
    have an effect, in the estimator's order); ``no_effect``: the components left out because they cannot
    have one (before the first position where the prompts differ); ``stopped``: why verification stopped;
    ``cost``: its forward-equivalents (one patched copy per component); ``extra``: those beyond the top-k and
    controls (what the direction's verify_budget paid)."""

    site: str
    all: list[Component] | list[Edge]
    approx: dict[str, Tensor]
    by_estimator: dict[str, dict[str, Tensor]]
    tops: dict[str, list[int]]
    top: list[int]
    control: list[int]
    rank_approx: Tensor
    mode: str = "top-k"
    no_effect: int = 0
    stopped: str | None = None
    cost: float = 0.0
    extra: float = 0.0

    @property
    def indices(self) -> list[int]:
        """The verified components' indices into ``all``: the top first, then the control sample."""
        return self.top + self.control

    @property
    def verified(self) -> list[Component]:
        return [self.all[j] for j in self.indices]

    def summary(self) -> dict:
        """How the site was verified, as report.json states it."""
        return {"mode": self.mode, "top": len(self.top), "control": len(self.control), "components": len(self.all),
                "no_effect": self.no_effect, "stopped": self.stopped, "forward_equivalents": self.cost,
                "beyond_top_k": self.extra}


@dataclass(kw_only=True)
class Finding:
    """One verified component (or edge) in one direction: its estimate and exact effect under the primary
    metric and every metric, ranks, why it was verified (``selected``: top | control), and what the screen
    found: ``flags`` (analysis/flags.py), the measured ``evidence`` and the ``causes`` (analysis/causes.py),
    which later stages add to. ``where``: the component's site, layer, head, neuron and pos, or the edge's
    sender and receiver. ``approx_estimators``: node screens only."""

    where: dict
    name: str
    direction: str
    selected: str
    approx: float
    exact: float
    rank_approx: int
    rank_exact: int
    approx_metrics: dict[str, float]
    exact_metrics: dict[str, float]
    exact_norm: dict[str, float]
    flags: list[str]
    evidence: dict
    causes: list[str]
    exact_ci: list[float] | None = None
    approx_estimators: dict[str, float] = field(default_factory=dict)

    @property
    def is_edge(self) -> bool:
        return "sender" in self.where

    def to_dict(self) -> dict:
        """The finding as report.json states it (NODE_KEYS or EDGE_KEYS, in that order)."""
        values = {**vars(self), **self.where}
        keys = EDGE_KEYS if self.is_edge else NODE_KEYS
        if self.is_edge and "pos" in self.where:  # a per-position edge (methods/edges/positions.py)
            keys = keys[:2] + ("pos",) + keys[2:]
        return {k: values[k] for k in keys}


def finding_dicts(findings: list[Finding]) -> list[dict]:
    """The one conversion of findings at the output boundary (ScreenResult.components, EdgeResult.edges)."""
    return [f.to_dict() for f in findings]


@dataclass
class Cost:
    """The screen's one tally of what it ran, every phase adding to it: forward passes (the two baseline
    runs, each estimator's forwards, every patched copy of the batch and the runs patching made) and the
    full-forward equivalents counted by exact patching (``verification``, frozen runs included) and by the
    frozen runs alone (``frozen``); None until a phase adds to it."""

    forward_passes: float = 2.0
    verification: float | None = None
    frozen: float | None = None

    def add_forwards(self, n: float) -> None:
        self.forward_passes += n

    def add_patch(self, passes: dict) -> None:
        """One patch call's passes (``Effects.passes``: its patched copies, the runs it made, their
        forward equivalents)."""
        self.forward_passes += passes.get("patched_rows", 0.0) + passes.get("runs", 2.0)
        self.verification = (self.verification or 0.0) + passes.get("forward_equivalents", 0.0)

    def add_frozen(self, passes: dict, attributions: float) -> None:
        """The frozen runs' patched passes and their attributions (``attributions`` forward equivalents)."""
        self.add_patch({**passes, "forward_equivalents": passes["forward_equivalents"] + attributions})
        self.forward_passes += passes["forward"]
        self.frozen = (self.frozen or 0.0) + passes["forward_equivalents"] + attributions

    def minus(self, before: "Cost") -> "Cost":
        """What was added since ``before`` (a copy of this tally taken earlier)."""
        since = lambda now, then: None if now is None else now - (then or 0.0)
        return Cost(forward_passes=self.forward_passes - before.forward_passes,
                    verification=since(self.verification, before.verification),
                    frozen=since(self.frozen, before.frozen))

    def add(self, other: "Cost") -> None:
        """Add another tally (another process's part of the same screen)."""
        plus = lambda a, b: a if b is None else (a or 0.0) + b
        self.forward_passes += other.forward_passes
        self.verification, self.frozen = plus(self.verification, other.verification), plus(self.frozen, other.frozen)

    def to_dict(self) -> dict:
        """report.json's names (under "timing"), the phases that ran only."""
        out = {"forward_passes": self.forward_passes}
        if self.verification is not None:
            out["forward_equivalents_verification"] = self.verification
        if self.frozen is not None:
            out["frozen_forward_equivalents"] = self.frozen
        return out
