"""Baselines every screen checks before any expensive work: per-pair logit differences, which pairs the
model solves, and whether the clean and corrupt runs are finite and tell the metric apart.

    logit_diff   [batch, vocab] logits -> [batch] logit[answer] - logit[wrong]
    solved       [batch] bool: the clean prompt's answer beats the wrong token
"""

import torch
from torch import nn

from ..config import ScreenConfig
from ..engine import distributed
from ..engine.forward import forward_last
from ..engine.hooks import eval_mode
from ..engine.metrics import MIN_GAP, Target, metric
from ..inputs.batch import PromptBatch
from ..model.sites import as_spec


def logit_diff(batch: PromptBatch, logits) -> torch.Tensor:
    """logit[answer] - logit[wrong] per pair: [batch, vocab] -> [batch]."""
    return metric("logit_diff", logits, Target(batch.answer, batch.wrong, logits[:, :0]))


def solved(model: nn.Module, batch: PromptBatch, batch_size: int | None = None) -> torch.Tensor:
    """Which pairs the model solves on the clean prompt (answer logit above the wrong one): [batch] bool."""
    spec = as_spec(model)
    out = []
    with eval_mode(spec.model), torch.no_grad():
        for chunk in batch.to(spec.device).chunks(batch_size):
            logits = forward_last(spec, chunk.run("clean"), chunk.mask, chunk.last)
            out.append(logit_diff(chunk, logits).cpu() > 0)
    return torch.cat(out)


def check_baselines(clean_logits, corrupt_logits, batch: PromptBatch, config: ScreenConfig,
                    reduce=lambda v: v) -> None:
    """Refuse, before any expensive work, baselines that are not finite or that the metric cannot tell
    apart (normalised effects would divide by ~0). ``reduce``: the cross-rank mean (every rank decides
    alike)."""
    target = Target.from_clean(batch.answer, batch.wrong, clean_logits)
    values = {}
    for run, logits in (("clean", clean_logits), ("corrupt", corrupt_logits)):
        bad = (~torch.isfinite(logits.float())).any(-1)
        if reduce(float(bad.any())) > 0:
            raise FloatingPointError(
                f"the {run} run's logits are not finite for prompts {bad.nonzero().flatten().tolist()}"
                f"{' (of this rank)' if distributed.active() else ''}; "
                "fp16 overflow is the usual cause: try --dtype bfloat16 or float32")
        values[run] = reduce(float(metric(config.metric, logits, target).mean()))
    if abs(values["clean"] - values["corrupt"]) < MIN_GAP:
        raise ValueError(
            f"clean and corrupt prompts give the same {config.metric} ({values['clean']:.6g} vs "
            f"{values['corrupt']:.6g}): the corruption does not change the behaviour, so effects cannot be "
            "normalised. Check the answer/wrong tokens and the corruption, or choose another --metric.")
