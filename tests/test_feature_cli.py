"""``attrpatch screen --sae``: the feature screen end to end on a tiny saved model with random dictionaries,
and its errors for bad dictionaries."""

import csv
import json

import pytest
import torch

from attrpatch.cli import main
from attrpatch.feature_screening import screen_features
from attrpatch.model.dictionaries import save_dictionary
from attrpatch.plot.features import plot_features
from conftest import random_pairs, saved_model, write_task
from test_features import random_dictionary


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features")
    _, folder = saved_model(tmp / "model", "gpt2")
    task = write_task(tmp / "task.jsonl", random_pairs(n=4))
    sae = save_dictionary(random_dictionary("resid_pre", 1, "topk", d_sae=64), tmp / "sae")
    from safetensors.torch import save_file
    plain = random_dictionary("mlp_out", 2, "jumprelu")
    save_file({k: getattr(plain, k) for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")},
              str(tmp / "plain.safetensors"))
    out = tmp / "run"
    argv = ["screen", "--model", str(folder), "--task", str(task), "--out", str(out), "--quiet", "--top-k", "5",
            "--random-k", "4", "--direction", "both", "--sites", "resid_pre", "--sae", str(sae),
            "--sae", f"{tmp / 'plain.safetensors'}@blocks.2.hook_mlp_out"]
    assert main(argv) == 0
    return tmp, folder, task, out


def test_screen_with_sae_writes_features_beside_the_sites(feature_run):
    _, _, _, out = feature_run
    found = json.loads((out / "features.json").read_text())
    assert set(found["agreement"]) == {"denoise", "noise"}
    assert set(found["agreement"]["denoise"]) == {"L1.resid_pre", "L2.mlp_out"}
    rows = list(csv.DictReader(open(out / "features.csv")))
    per = {(r["direction"], r["hook"], r["chosen"]) for r in rows}
    assert ("denoise", "L1.resid_pre", "top") in per and ("noise", "L2.mlp_out", "control") in per
    assert sum(r["chosen"] == "top" for r in rows if r["direction"] == "denoise" and r["hook"] == "L1.resid_pre") == 5
    assert any(r["name"].startswith("L1F") for r in rows) and any(".sae_error@" in r["name"] for r in rows)
    report = (out / "report.md").read_text()
    assert "## Features" in report and "Top features of L1.resid_pre" in report
    assert (out / "figures" / "features_denoise.png").stat().st_size > 0
    report_json = json.loads((out / "report.json").read_text())
    assert "components" in report_json  # the site screen is written as without --sae


def test_plot_features_returns_a_figure(feature_run):
    from matplotlib.figure import Figure
    _, _, _, out = feature_run
    assert isinstance(plot_features(out, "noise"), Figure)


@pytest.mark.parametrize("sae, message", [
    ("missing", "no dictionary at"),
    ("plain.safetensors", "no hook point"),
    ("plain.safetensors@blocks.1.hook_q", "unknown hook 'blocks.1.hook_q'"),
    ("narrow", "d_in=16 but GPT2LMHeadModel has d_model=32"),
    ("plain.safetensors@L7.resid_pre", "hook L7.resid_pre out of range"),
])
def test_bad_dictionaries_give_a_clear_error_without_traceback(feature_run, capsys, sae, message):
    tmp, folder, task, _ = feature_run
    save_dictionary(random_dictionary(d_model=16), tmp / "narrow")
    code = main(["screen", "--model", str(folder), "--task", str(task), "--out", str(tmp / "bad"), "--quiet",
                 "--sae", str(tmp / sae)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("attrpatch: error: ") and message in err and "Traceback" not in err


def test_feature_screen_verifies_the_top_latents_exactly():
    import attrpatch as ap
    from conftest import tiny_model
    from attrpatch.config import ScreenConfig
    model, batch = tiny_model("llama"), ap.make_batch(random_pairs())
    d = random_dictionary("resid_pre", 1, "standard")
    found = screen_features(model, batch, [d], ScreenConfig(top_k=4, random_k=3, sites=("resid_pre",)))
    assert [r["chosen"] for r in found.rows] == ["top"] * 4 + ["control"] * 3
    ranks = [r["rank_approx"] for r in found.rows[:4]]
    assert ranks == [1, 2, 3, 4]
    assert torch.isfinite(torch.tensor([r["exact_logit_diff"] for r in found.rows])).all()
