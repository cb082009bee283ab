"""attrpatch: attribution patching for every component of a HuggingFace causal LM, verified by exact
activation patching.

Data flows through the stages in this order (each imports only from itself and earlier ones):
inputs -> model -> engine -> methods (estimators, patching, edges) -> config -> analysis -> output -> plot
-> steps -> screening | edge_screening (siblings) -> prompts -> pipeline -> planning -> edge_planning -> cli
(scripts/layout.py checks it)."""

from .config import EdgeConfig, ScreenConfig
from .edge_screening import EdgeResult, screen_edges
from .engine.metrics import ALL_METRICS, DISCRETE_METRICS, METRICS, Target, metric
from .inputs.batch import PromptBatch, make_batch
from .inputs.directions import DIRECTIONS
from .inputs.pairs import PromptPair, load_jsonl
from .inputs.tasks import TASKS, builtin_task
from .methods.ablation import ABLATIONS
from .methods.edges.eap import EdgeScores, attribute_edges
from .methods.edges.graph import Edge
from .methods.edges.patching import EdgeEffects, patch_edges
from .methods.edges.positions import PositionEdge
from .methods.estimators.attribution import ESTIMATORS, Scores, attribute
from .methods.patching.exact import Effects, patch
from .methods.patching.features import patch_features
from .model.dictionaries import Dictionary, load_dictionary
from .model.archs import ARCHS, Arch, arch_from_json, register_arch, use_arch
from .model.fetch import fetch
from .model.loading import load
from .model.sites import SITES, Component, components, model_spec
from .screening import ScreenResult, screen

__version__ = "0.1.0"

__all__ = [
    "ABLATIONS", "ARCHS", "Arch", "Component", "DIRECTIONS", "Dictionary", "ESTIMATORS", "Edge", "EdgeConfig", "EdgeEffects", "EdgeResult",
    "ALL_METRICS", "DISCRETE_METRICS", "EdgeScores", "Effects", "METRICS", "PositionEdge", "PromptBatch", "PromptPair", "SITES", "ScreenConfig", "ScreenResult",
    "Scores", "TASKS", "Target", "arch_from_json", "attribute", "attribute_edges", "builtin_task", "components",
    "fetch", "load", "load_dictionary", "load_jsonl", "make_batch", "metric", "model_spec", "patch", "patch_edges", "patch_features", "register_arch", "screen",
    "screen_edges", "use_arch",
]
