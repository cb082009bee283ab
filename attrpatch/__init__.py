"""attrpatch: attribution patching for every component of a HuggingFace causal LM, verified by exact
activation patching. Data flows sites -> capture -> attribute -> patch -> compare -> report/plot."""

from .attribute import Scores, attribute
from .batch import DIRECTIONS, PromptBatch, make_batch
from .metrics import METRICS, Target, metric
from .patch import Effects, patch
from .sites import ARCHS, SITES, Arch, Component, components, model_spec, register_arch

__version__ = "0.1.0"

__all__ = [
    "ARCHS", "Arch", "Component", "DIRECTIONS", "Effects", "METRICS", "PromptBatch", "SITES", "Scores",
    "Target", "attribute", "components", "make_batch", "metric", "model_spec", "patch", "register_arch",
]
