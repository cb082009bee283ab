"""The memory plan (planning.py) against the same tracker (engine/memory.py) on real tensors: the planned peak of
each phase is within 10% of the measured peak of the same run, on the embedded toy model and on SmolLM2."""

from dataclasses import replace

import pytest
import torch

from attrpatch.inputs.batch import make_batch
from attrpatch.model.loading import load
from attrpatch.pipeline import _pad, prepare_pairs
from attrpatch.planning import plan_screen, trace_screen
from attrpatch.screening import ScreenConfig

DEFAULT = ScreenConfig(progress=False)  # a default screen: every default site, top-30 + 20 controls, every metric


def _ioi_batch(model, tokenizer, n_prompts: int):
    pairs, _ = prepare_pairs(model, tokenizer, task="ioi", n_prompts=n_prompts, per_position=True)
    return make_batch(pairs, pad_id=_pad(tokenizer))


def _differing_from_the_start(batch):
    """``batch`` with every corrupt prompt's first token changed too: no prefix shared with the clean prompt,
    as the plan assumes (planning.py)."""
    corrupt = batch.corrupt.clone()
    corrupt[:, 0] = batch.clean[:, 0] + 1
    return replace(batch, corrupt=corrupt)


def _plan_and_measure(model, batch, config=DEFAULT) -> tuple[dict, dict]:
    """(plan, measurement) of the same screen on the CPU: the measured run takes the plan's copies per pass."""
    plan = plan_screen(model.config, config, n_prompts=batch.n, seq_len=batch.n_pos, device="cpu")
    measured = trace_screen(model, batch, replace(config, copies=plan["settings"]["copies"]))
    return plan, measured


def _assert_within(plan: dict, measured: dict, share: float = 0.10) -> None:
    assert plan["weights_bytes"] == measured["weights_bytes"]
    for phase in ("attribution", "verification"):
        real, planned = measured["phases"][phase]["peak_bytes"], plan["phases"][phase]["peak_bytes"]
        assert abs(planned - real) <= share * real, (phase, planned, real)


def test_plan_of_a_default_screen_of_the_embedded_model_is_within_10_percent_of_the_measured_run():
    """16 IOI pairs of 14 tokens whose corrupt prompts differ from the first token: planned and measured peaks
    were equal to the byte (attribution 14.44 MB, verification 27.90 MB, weights 2.51 MB)."""
    model, tokenizer = load(None)
    batch = _differing_from_the_start(_ioi_batch(model, tokenizer, 16))
    _assert_within(*_plan_and_measure(model, batch))


def test_plan_is_an_upper_bound_when_the_prompts_share_a_prefix():
    """The real IOI prompts share the tokens before S2, which patched passes skip: measured verification 22.37
    MB against the plan's 27.90 MB (the plan assumes no shared prefix); attribution is the same."""
    model, tokenizer = load(None)
    plan, measured = _plan_and_measure(model, _ioi_batch(model, tokenizer, 16))
    assert plan["phases"]["attribution"]["peak_bytes"] == measured["phases"]["attribution"]["peak_bytes"]
    assert plan["phases"]["verification"]["peak_bytes"] >= measured["phases"]["verification"]["peak_bytes"]


@pytest.mark.real_model
def test_plan_of_a_default_screen_of_smollm2_is_within_10_percent_of_the_measured_run():
    """4 IOI pairs of 14 tokens, default sites (neurons included): planned and measured peaks were equal to the
    byte (weights 538.1 MB, attribution 634.5 MB, verification 704.9 MB, its largest buffer the [144, 49152]
    logits of a pass of 36 copies x 4 prompts)."""
    from attrpatch.model.fetch import fetch

    torch.set_num_threads(1)
    model, tokenizer = load(fetch("smollm2"))
    _assert_within(*_plan_and_measure(model, _ioi_batch(model, tokenizer, 4)))
