"""What a screen returns, typed: ``ScreenResult`` (the node screen, screening.screen) and ``EdgeResult`` (the
edge screen, edge_screening.screen_edges). Defined here, before the outputs, so that output/report.py and
output/edge_report.py read them as the types they are (scripts/layout.py checks that a module reading a
result's fields imports its type). Their findings are dicts already (records.finding_dicts, at the output
boundary); the scores stay tensors. Pure data: no model here."""

from dataclasses import dataclass, field

from ..config import EdgeConfig, ScreenConfig
from ..methods.edges.eap import EdgeScores
from ..methods.estimators.attribution import Scores


@dataclass
class ScreenResult:
    """Everything a report or a figure needs. ``rows`` is the long table: one row per verified component
    x direction x metric. ``components``: one entry per verified component x direction."""

    config: ScreenConfig
    model: str
    n_prompts: int
    n_pos: int
    clean_metric: dict[str, float]
    corrupt_metric: dict[str, float]
    scores: dict[str, Scores]
    components: list[dict]
    rows: list[dict]
    agreement: dict  # direction -> site -> metric -> Agreement dict
    false_negatives: dict  # direction -> site -> FalseNegatives dict
    attention: dict  # direction -> {"max_prob": [[..]], "entropy": [[..]]} per layer x head (receiver run)
    estimators: dict  # direction -> estimator -> {"cost": .., "sites": site -> agreement + false negatives}
    numerical: dict  # non-finite scores and effects, named per component
    verification: dict = field(default_factory=dict)  # direction -> site -> SitePlan.summary(): how it was verified
    timing: dict = field(default_factory=dict)
    sanity: dict = field(default_factory=dict)  # the clean-run check (analysis.sanity)


@dataclass
class EdgeResult:
    """``edges``: one entry per verified edge x direction; ``circuit``: the faithfulness curve."""

    config: EdgeConfig
    model: str
    n_prompts: int
    n_edges: int
    clean_metric: dict[str, float]
    corrupt_metric: dict[str, float]
    scores: dict[str, EdgeScores]
    edges: list[dict]
    agreement: dict  # direction -> metric -> Agreement dict
    false_negatives: dict  # direction -> FalseNegatives dict
    circuit: dict
    timing: dict = field(default_factory=dict)
    sanity: dict = field(default_factory=dict)  # the clean-run check (analysis.sanity), as in the node screen
    mib: dict = field(default_factory=dict)  # MIB's CPR, CMD and curve (edge_mib.py), with config.mib
    mib_export: object = None  # edge_mib.MibScores: what --mib FILE writes
