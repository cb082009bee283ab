"""bfloat16 you can trust: scores and effects accumulate in float32 whatever the model's dtype, the run records
the dtype, and on SmolLM2 a bf16 screen agrees with a float32 one within bf16's own spread."""

import json
import warnings

import pytest
import torch

import attrpatch as ap
from attrpatch.config import ScreenConfig
from attrpatch.methods.edges.eap import attribute_edges
from attrpatch.methods.edges.graph import Edge
from attrpatch.methods.edges.patching import patch_edges
from attrpatch.pipeline import run_screen
from conftest import random_pairs, tiny_model

ESTIMATORS = ("atp", "atp_star", "ig", "graddrop", "relp", "gim", "relp_gim")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_bf16_scores_and_effects_are_float32(estimator):
    model = tiny_model("llama", dtype=torch.bfloat16)
    batch = ap.make_batch(random_pairs(3))
    for low_memory in (False, True) if estimator == "atp" else (False,):
        scores = ap.attribute(model, batch, sites=["resid_pre", "head", "neuron"], metrics=["logit_diff", "kl"],
                              estimator=estimator, ig_steps=2, recompute=low_memory)
        assert {t.dtype for per in scores.values.values() for t in per.values()} == {torch.float32}
    effects = ap.patch(model, batch, [ap.Component("head", 1, None, 2)], metrics=["logit_diff", "kl"], per_prompt=True)
    assert effects.values.dtype == effects.per_prompt.dtype == torch.float32


def test_bf16_edge_scores_and_effects_are_float32():
    model = tiny_model("llama", dtype=torch.bfloat16)
    batch = ap.make_batch(random_pairs(3))
    assert attribute_edges(model, batch).values["logit_diff"].dtype == torch.float32
    assert patch_edges(model, batch, [Edge("L0H2", "L1H1.v")]).values.dtype == torch.float32


def test_the_run_records_the_model_dtype_and_the_accumulation_dtype(tmp_path):
    model = tiny_model("gpt2", dtype=torch.bfloat16)
    task = tmp_path / "pairs.jsonl"
    task.write_text("".join(json.dumps({"clean_ids": p.clean_ids, "corrupt_ids": p.corrupt_ids, "answer_id": p.answer_id,
                                        "wrong_id": p.wrong_id}) + "\n" for p in random_pairs(3)))
    run_screen(model, None, task=str(task), config=ScreenConfig(sites=("head",), top_k=2, random_k=1, progress=False),
               out=tmp_path / "run", model_name="tiny", figures=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["accumulation_dtype"] == "float32"


@pytest.mark.real_model
def test_smollm2_bf16_agrees_with_float32_within_the_spread_of_bf16():
    """8 IOI pairs, resid_pre, attn_out (per position) and head: AtP Pearson bf16 vs float32 was 0.99990,
    0.99997, 0.99996; exact effects of the float32 run's top 4 per site, patched in both dtypes: max |bf16 -
    float32| 0.098 in logit difference, 0.7% of the effects' range (13.8), and per prompt 0.228, against
    bf16's own spread of 0.235: the largest per-prompt |bf16 - float32| logit difference of the unpatched clean
    run (corrupt run: 0.080). An effect is a difference of two forwards, so the bound asserted is twice that
    spread. (bf16 on this CPU is slow: attribution took 12x float32's.)"""
    from attrpatch.analysis.baselines import logit_diff
    from attrpatch.engine.forward import forward_last
    from attrpatch.inputs.batch import make_batch
    from attrpatch.model.fetch import fetch
    from attrpatch.model.loading import load
    from attrpatch.prompts import pad_token, prepare_pairs

    torch.set_num_threads(1)
    sites, each = ["resid_pre", "attn_out", "head"], {"resid_pre": True, "attn_out": True, "head": False}
    found, comps = {}, None
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load(fetch("smollm2"), dtype=dtype, progress=False)
        pairs, _ = prepare_pairs(model, tokenizer, task="ioi", n_prompts=8, per_position=True)
        batch = make_batch(pairs, pad_id=pad_token(tokenizer))
        scores = ap.attribute(model, batch, sites=sites, metrics=["logit_diff"], prompt_positions=each)
        comps = comps or [c for s in sites for c in _top(scores.values["logit_diff"][s], s, 4)]
        effects = ap.patch(model, batch, comps, metrics=["logit_diff"], per_prompt=True)
        with torch.no_grad():
            clean = logit_diff(batch, forward_last(ap.model_spec(model), batch.clean, batch.mask, batch.last))
        found[dtype] = (scores, effects, clean.float())
    (s32, e32, clean32), (s16, e16, clean16) = found["float32"], found["bfloat16"]
    for s in sites:
        pair = torch.stack([s32.values["logit_diff"][s].flatten(), s16.values["logit_diff"][s].flatten()]).double()
        assert torch.corrcoef(pair)[0, 1] >= 0.999, s
    spread = float((clean16 - clean32).abs().max())
    assert 0 < float((e16.per_prompt - e32.per_prompt).abs().max()) <= 2 * spread
    assert float((e16.values - e32.values).abs().max()) <= 0.02 * float(e32.values.max() - e32.values.min())


def _top(values: torch.Tensor, site: str, k: int) -> list:
    """The k components of ``site`` with the largest |score| (values [layer, pos, (unit)], per position unless
    a head site, whose scores sum over positions)."""
    out = []
    for j in values.flatten().abs().argsort(descending=True)[:k].tolist():
        at = [int(i) for i in torch.unravel_index(torch.tensor(j), values.shape)]
        out.append(ap.Component(site, layer=at[0], pos=None, unit=at[2]) if site == "head"
                   else ap.Component(site, layer=at[0], pos=at[1]))
    return out


def test_half_precision_on_the_cpu_warns_that_its_backward_is_slow_and_float32_does_not():
    with pytest.warns(UserWarning, match=r"--dtype bfloat16 on the CPU.*use --dtype float32"):
        ap.load(dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ap.load(dtype="float32")
