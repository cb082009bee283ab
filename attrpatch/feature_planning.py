"""The memory plan of a feature screen (feature_screening.py): ``attrpatch plan --sae PATH`` adds its phases
to the screen's plan (planning.py), traced the same way, on meta weights and meta dictionaries (their
shapes read from the safetensors header, no weight read).

  features          methods/estimators/attribution.attribute with the dictionaries spliced in and no site,
                    once per estimator that scores latents (feature_screening.feature_estimators), for the
                    first direction: per dictionary the dense encoding [batch, pos, d_sae] inside its hook,
                    the source run's kept latents [batch, pos, k] and error [batch, pos, d_model], the
                    receiving run's deltas [batch, pos, k] and its latent gradient [batch, pos, k], the scores
                    [pos, k].
  feature_patching  methods/patching/features.patch_features of one dictionary's top-k + control components
                    (the largest dictionary: the screen patches one at a time), the first chunk of prompts.

k, the latents active somewhere in a chunk, depends on the prompts; the plan takes every latent as active
(k = d_sae, engine/splicing.active on meta tensors): the most the sparse storage holds. A real run keeps
only the active ones (a TopK SAE's k <= 2 * batch * pos * its own k), so it needs no more than planned.
The dictionaries' weights are counted as live from the start, on the model's device.
"""

from dataclasses import replace
from typing import Sequence

from .config import ScreenConfig
from .engine.memory import MemoryTracker, fused_attention
from .engine.metrics import graded
from .feature_screening import feature_estimators
from .inputs.batch import PromptBatch
from .methods.estimators.attribution import attribute
from .methods.patching.features import patch_features
from .model import hf_compat
from .model.dictionaries import Dictionary
from .model.sites import Component, as_spec

FEATURE_PHASES = ("features", "feature_patching")


def trace_features(model, batch: PromptBatch, dictionaries: Sequence[Dictionary], config: ScreenConfig) -> dict:
    """The memory of a feature screen's attribution and patching (module docstring) of ``model`` on ``batch``:
    MemoryTracker.summary() with the phases FEATURE_PHASES."""
    spec, config = as_spec(model), replace(config, progress=False)
    dtype = next(spec.model.parameters()).dtype
    dictionaries = [d.to(spec.device, dtype) for d in dictionaries]
    direction = config.directions[0]
    tracker = MemoryTracker(model)
    tracker.register([getattr(d, k) for d in dictionaries for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")])
    with fused_attention(), hf_compat.meta_autocast(), tracker:
        with tracker.phase("features"):
            for est in feature_estimators(config):
                scores = attribute(spec, batch, sites=[], metrics=graded(config.metrics), direction=direction,
                                   estimator=est, ig_steps=config.ig_steps, batch_size=config.batch_size,
                                   dictionaries=dictionaries)
                del scores
        widest = max(dictionaries, key=lambda d: d.d_sae)
        n = min((config.top_k or widest.d_sae) + config.random_k, widest.d_sae)
        comps = [Component("feature", widest.layer, batch.n_pos - 1, i) for i in range(n)]
        with tracker.phase("feature_patching"):
            effects = patch_features(spec, batch.rows(slice(0, config.batch_size or batch.n)), [widest], comps,
                                     metrics=config.metrics, direction=direction, copies=config.copies or 8)
            del effects
    return tracker.summary()


def add_features(plan: dict, features: dict, dictionaries: Sequence[Dictionary]) -> dict:
    """A screen's plan (planning.plan_screen) with the feature screen's phases added; the peak and devices are
    over both; ``plan["settings"]["dictionaries"]``: each one's hook and width."""
    for name in FEATURE_PHASES:
        plan["phases"][name] = features["phases"][name]
        for device, peak in features["phases"][name]["devices"].items():
            plan["devices"][device] = max(plan["devices"].get(device, 0), peak)
    plan["peak_bytes"] = max(plan["peak_bytes"], features["peak_bytes"])
    if features.get("largest") and features["largest"]["bytes"] > (plan.get("largest") or {}).get("bytes", 0):
        plan["largest"] = features["largest"]
    plan["settings"]["dictionaries"] = [f"{d.hook} ({d.d_sae} latents)" for d in dictionaries]
    return plan
