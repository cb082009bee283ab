"""attrpatch: attribution patching for every component of a HuggingFace causal LM, verified by exact
activation patching. Data flows sites -> capture -> attribute -> patch -> compare -> report/plot."""

from .attribute import ESTIMATORS, Scores, attribute
from .batch import DIRECTIONS, PromptBatch, make_batch
from .metrics import METRICS, Target, metric
from .patch import Effects, patch
from .screen import ScreenConfig, ScreenResult, screen
from .sites import ARCHS, SITES, Arch, Component, components, model_spec, register_arch
from .tasks import TASKS, PromptPair, builtin_task, load_jsonl

__version__ = "0.1.0"

__all__ = [
    "ARCHS", "Arch", "Component", "DIRECTIONS", "ESTIMATORS", "Effects", "METRICS", "PromptBatch", "PromptPair",
    "SITES", "ScreenConfig", "ScreenResult", "Scores", "TASKS", "Target", "attribute", "builtin_task",
    "components", "load_jsonl", "make_batch", "metric", "model_spec", "patch", "register_arch", "screen",
]
