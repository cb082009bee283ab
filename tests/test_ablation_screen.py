"""Ablations as a screen option (ScreenConfig(ablation=...), --ablation): every component's exact effect equals a
naive one-hook ablation of the clean run, AtP uses the ablated values as its source (exact where the metric is
linear in the component), and every output says it is an ablation, not a corrupted prompt."""

import csv
import json

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import attrpatch as ap  # noqa: E402
from attrpatch.cli import main  # noqa: E402
from attrpatch.config import ScreenConfig
from attrpatch.pipeline import run_screen  # noqa: E402
from attrpatch.plot import figures  # noqa: E402
from attrpatch.screening import screen  # noqa: E402
from conftest import random_pairs, saved_model, tiny_model, write_task  # noqa: E402
from reference import ablation_reference  # noqa: E402

SITES = ("resid_pre", "mlp_out", "head", "neuron")


def _component(e: dict) -> ap.Component:
    unit = e["head"] if e["head"] is not None else e["neuron"]
    return ap.Component(e["site"], e["layer"], pos=e["pos"], unit=unit)


@pytest.mark.parametrize("ablation", ap.ABLATIONS)
def test_each_ablations_screen_effects_equal_a_naive_reference(ablation):
    model, batch = tiny_model("llama"), ap.make_batch(random_pairs(n=4))
    config = ScreenConfig(sites=SITES, metrics=("logit_diff", "prob"), direction="noise", top_k=6, random_k=3,
                          ablation=ablation, batch_size=3, progress=False, verify_budget=0)  # the top-k + controls
    result = screen(model, batch, config)
    assert len(result.components) == len(SITES) * 9
    for e in result.components:
        for m in ("logit_diff", "prob"):
            naive = ablation_reference(model, batch, _component(e), ablation, m)
            assert e["exact_metrics"][m] == pytest.approx(naive, abs=1e-4), (e["name"], m)


def _linear_head(family: str):
    """A tiny model without its final norm: the logits, and so logit_diff, are linear in the last layer's MLP
    output and neurons (its attention output still passes through its MLP)."""
    model = tiny_model(family)
    if family == "gpt2":
        model.transformer.ln_f = torch.nn.Identity()
    else:
        model.model.norm = torch.nn.Identity()
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("ablation", ap.ABLATIONS)
def test_atp_equals_exact_for_an_ablation_where_the_metric_is_linear_in_the_component(family, ablation):
    model, batch = _linear_head(family), ap.make_batch(random_pairs(n=4))
    last = model.config.num_hidden_layers - 1
    config = ScreenConfig(sites=("mlp_out", "neuron"), metric="logit_diff", metrics=("logit_diff",),
                          direction="noise", top_k=None, random_k=0, ablation=ablation, progress=False)
    comps = [e for e in screen(model, batch, config).components if e["layer"] == last]
    assert len(comps) > 8 and any(abs(e["exact"]) > 1e-2 for e in comps)
    for e in comps:
        assert e["approx"] == pytest.approx(e["exact"], abs=1e-4), e["name"]


def test_atp_of_an_ablation_is_not_the_corrupt_prompts_atp():
    model, batch = _linear_head("gpt2"), ap.make_batch(random_pairs(n=4))
    scores = {ab: ap.attribute(model, batch, sites=("mlp_out",), direction="noise", ablation=ab).values["logit_diff"]
              ["mlp_out"] for ab in (None, "zero")}
    assert not torch.allclose(scores[None], scores["zero"])


def test_an_ablation_run_is_labelled_as_one_everywhere(tmp_path):
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=4))
    config = ScreenConfig(sites=("resid_pre", "head"), direction="noise", top_k=3, random_k=1, ablation="mean",
                          progress=False)
    report = run_screen(tiny_model("gpt2"), None, task=str(task), config=config, out=tmp_path / "run",
                        model_name="tiny", figures=False)
    assert report["corruption"]["method"] == "mean_ablation" and report["corruption"]["ablation"] == "mean"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["corruption"]["ablation"] == "mean" and manifest["options"]["ablation"] == "mean"
    md = (tmp_path / "run" / "report.md").read_text()
    assert "**mean ablation**, not a corrupted prompt" in md and "## Mean ablation: is it necessary?" in md
    assert "Corruption: `" not in md
    rows = list(csv.DictReader(open(tmp_path / "run" / "results.csv")))
    assert rows and {r["corruption"] for r in rows} == {"mean_ablation"}
    titles = [fig.axes[0].get_title(loc="left") for _, fig in figures(tmp_path / "run")]
    assert titles and all(t.startswith("mean ablation, not a corrupted prompt") for t in titles)


def test_ablation_refuses_denoising_other_estimators_and_several_corruptions(tmp_path, capsys):
    with pytest.raises(ValueError, match="noising direction only.*direction 'both' makes no sense"):
        ScreenConfig(ablation="zero", direction="both")
    with pytest.raises(ValueError, match="ablations are scored by AtP only"):
        ScreenConfig(ablation="zero", direction="noise", estimator="ig")
    with pytest.raises(ValueError, match="Unknown ablation 'means'; known: zero, mean, resample"):
        ScreenConfig(ablation="means", direction="noise")
    with pytest.raises(ValueError, match="resample ablation .* at least 2 prompts"):
        screen(tiny_model("gpt2"), ap.make_batch(random_pairs(n=1)),
               ScreenConfig(sites=("mlp_out",), direction="noise", ablation="resample", progress=False))
    _, folder = saved_model(tmp_path / "model")
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=3))
    args = ["screen", "--model", str(folder), "--task", str(task), "--quiet", "--no-figures", "--sites", "mlp_out",
            "--top-k", "2", "--random-k", "0", "--ablation", "zero", "--out", str(tmp_path / "run")]
    assert main([*args, "--direction", "denoise"]) == 2
    assert "direction 'denoise' makes no sense with an ablation" in capsys.readouterr().err
    assert main([*args, "--corruption", "str,noise"]) == 2
    assert "it takes one --corruption" in capsys.readouterr().err
    assert main(args) == 0  # the direction defaults to noise with --ablation
    assert "**zero ablation**" in capsys.readouterr().out
