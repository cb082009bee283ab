"""Several corruptions in one run: each is the run of that corruption alone, labelled, and their comparison
flags the components whose effect changes sign or importance with the corruption."""

import json

import matplotlib
import pytest

matplotlib.use("Agg")

from attrpatch.analysis.flags import corruption_comparison  # noqa: E402
from attrpatch.cli import main  # noqa: E402
from attrpatch.config import ScreenConfig  # noqa: E402
from attrpatch.pipeline import run_screen  # noqa: E402
from attrpatch.plot.corruptions import key_lines, plot_corruptions  # noqa: E402
from conftest import random_pairs, tiny_model, write_task  # noqa: E402

CONFIG = dict(sites=("resid_pre", "mlp_out", "head"), top_k=None, random_k=0, direction="both", progress=False)
SAME = ("clean_metric", "corrupt_metric", "components", "agreement", "false_negatives", "corruption", "tokens")


def _run(tmp_path, corruption, out):
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=4))
    return run_screen(tiny_model("gpt2"), None, task=str(task), config=ScreenConfig(**CONFIG), out=tmp_path / out,
                      model_name="tiny", figures=False, corruption=corruption)


def test_a_run_with_two_corruptions_equals_two_single_corruption_runs(tmp_path):
    both = _run(tmp_path, "str,noise", "both")
    for label in ("str", "noise"):
        alone = _run(tmp_path, label, label)
        side = json.loads((tmp_path / "both" / label / "report.json").read_text())
        single = json.loads((tmp_path / label / "report.json").read_text())
        assert {k: side[k] for k in SAME} == {k: single[k] for k in SAME}
        assert side["corruption"]["method"] == label == both["runs"][label]["corruption"]["method"]
        assert f"Corruption: `{label}`" in (tmp_path / "both" / label / "report.md").read_text()
        assert alone["components"] == both["runs"][label]["components"]
    comp = json.loads((tmp_path / "both" / "corruptions.json").read_text())
    assert comp["corruptions"] == ["str", "noise"]
    n_each = len(both["runs"]["str"]["components"])
    assert len(comp["components"]) == n_each  # every component is verified under both (top_k all)
    assert "Where the corruptions disagree" in (tmp_path / "both" / "corruptions.md").read_text()
    fig = plot_corruptions(tmp_path / "both", "denoise")
    lines = key_lines(comp, "resid_pre", "denoise")
    assert [list(line.get_ydata()) for line in fig.axes[0].lines[:2]] == [
        pytest.approx([v for _, v, _ in lines[k]]) for k in ("str", "noise")]


def test_corruptions_disagree_flags_sign_and_importance_changes_only():
    def entry(name, value):
        return {"name": name, "direction": "denoise", "site": "head", "layer": 0, "pos": None,
                "exact_norm": {"logit_diff": value}}
    runs = {"str": [entry("A", 0.5), entry("B", 0.5), entry("C", 0.5), entry("D", 0.3)],
            "noise": [entry("A", -0.4), entry("B", 0.01), entry("C", 0.45), entry("E", 0.9)]}
    out = {e["name"]: e for e in corruption_comparison(runs, "logit_diff")}
    assert set(out) == {"A", "B", "C"}  # D and E are verified under one corruption only
    assert [n for n, e in sorted(out.items()) if "corruptions_disagree" in e["flags"]] == ["A", "B"]
    assert out["A"]["exact_norm"] == {"str": 0.5, "noise": -0.4}


def test_cli_runs_several_corruptions_and_refuses_an_unknown_one(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_model("gpt2").save_pretrained(folder)
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=3))
    args = ["screen", "--model", str(folder), "--task", str(task), "--quiet", "--no-figures", "--top-k", "2",
            "--random-k", "1", "--sites", "resid_pre"]
    assert main([*args, "--out", str(tmp_path / "run"), "--corruption", "str,noise"]) == 0
    printed = capsys.readouterr().out
    assert "# Corruptions compared: str, noise" in printed
    assert (tmp_path / "run" / "noise" / "report.json").exists() and (tmp_path / "run" / "str" / "results.csv").exists()
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "bad"), "--corruption", "str,gauss"])
    assert "unknown ['gauss']; choose from str, abc, noise" in capsys.readouterr().err
