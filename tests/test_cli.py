"""The screen end to end through the CLI, on tiny random models saved to and loaded from a folder."""

import csv
import re
import json

import pytest
import torch

import attrpatch as ap
from attrpatch.cli import main
from attrpatch.config import ScreenConfig
from attrpatch.screening import screen
from conftest import random_pairs, saved_model, tiny_model, write_task


def _save_model(tmp_path, family="gpt2"):
    return saved_model(tmp_path / f"model-{family}", family)


_write_task = write_task


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model, folder = _save_model(tmp)
    pairs = random_pairs(n=4)
    task = _write_task(tmp / "task.jsonl", pairs)
    out = tmp / "run"
    code = main(["screen", "--model", str(folder), "--task", str(task), "--out", str(out), "--quiet",
                 "--no-figures", "--top-k", "4", "--random-k", "3", "--direction", "both",
                 "--sites", "resid_pre,attn_out,head,neuron"])
    assert code == 0
    return model, pairs, out


def test_cli_writes_a_valid_report(cli_run):
    _, pairs, out = cli_run
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "task", "n_prompts", "direction", "metric", "metrics", "clean_metric", "corrupt_metric",
                "components", "agreement", "timing"):
        assert key in report, key
    assert report["n_prompts"] == len(pairs)
    assert (report["dtype"], report["accumulation_dtype"]) == ("float32", "float32")  # the report states the dtype
    assert set(report["clean_metric"]) == set(ap.METRICS)
    c = report["components"][0]
    for key in ("direction", "site", "layer", "head", "neuron", "pos", "approx", "exact", "exact_metrics",
                "rank_approx", "rank_exact", "flags"):
        assert key in c, key
    per_site = {s: sum(1 for c in report["components"] if c["site"] == s and c["direction"] == "denoise")
                for s in ("resid_pre", "attn_out", "head", "neuron")}
    how = report["verification"]["denoise"]
    assert per_site == {s: how[s]["top"] + how[s]["control"] for s in per_site}
    assert how["neuron"]["top"] >= 4 and how["neuron"]["control"] == 3  # the top 4 (or more, grown) + 3 controls
    assert {how[s]["mode"] for s in ("resid_pre", "attn_out", "head")} == {"exhaustive"}  # within --verify-budget
    for key in ("pearson", "spearman", "sign_agreement", "recall_at_k"):
        assert key in report["agreement"]["denoise"]["head"]["logit_diff"]
    for key in ("attribution_s", "verification_s", "forward_s", "forward_passes"):
        assert report["timing"][key] > 0
    for name in ("report.md", "results.csv", "scores.safetensors", "manifest.json"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == len(report["components"]) * len(ap.METRICS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights"].startswith("sha256:") and manifest["versions"]["torch"] == torch.__version__


def test_cli_exact_values_equal_the_engine(cli_run):
    model, pairs, out = cli_run
    report = json.loads((out / "report.json").read_text())
    batch = ap.make_batch(pairs)
    for direction in ("denoise", "noise"):
        entries = [c for c in report["components"] if c["direction"] == direction]
        comps = [ap.Component(c["site"], c["layer"], c["pos"], c["head"] if c["head"] is not None else c["neuron"])
                 for c in entries]
        eff = ap.patch(model, batch, comps, metrics=list(ap.METRICS), direction=direction, copies=1, resume=False)
        for c, e in zip(comps, entries):
            for m in ap.METRICS:
                assert e["exact_metrics"][m] == pytest.approx(eff.effect(c, m), abs=1e-5)


def test_scores_file_holds_every_component(cli_run):
    from attrpatch.output.report import load_scores
    _, pairs, out = cli_run
    tensors, axes = load_scores(out / "scores.safetensors")
    assert tensors["denoise/logit_diff/head"].shape == (3, len(pairs[0].clean_ids), 4)
    assert axes["denoise/logit_diff/neuron"] == "layer pos neuron"


def test_malformed_jsonl_line_is_named(tmp_path, capsys):
    _, folder = _save_model(tmp_path)
    task = _write_task(tmp_path / "bad.jsonl", random_pairs(n=2))
    with open(task, "a") as f:
        f.write('{"clean_ids": [1, 2], "corrupt_ids": [1, 2], "answer_id": 3}\n')
    argv = ["screen", "--model", str(folder), "--task", str(task), "--out", str(tmp_path / "o"), "--quiet",
            "--no-figures"]
    capsys.readouterr()  # the setup's own output (saving the model may draw a bar) is not the CLI's
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"^attrpatch: error: .*bad\.jsonl:3:.*wrong_id", err) and "Traceback" not in err
    with pytest.raises(ValueError, match=r"bad\.jsonl:3:.*wrong_id"):
        main([*argv, "--debug"])


def test_bad_site_is_refused_with_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["screen", "--sites", "attn_ouput"])
    assert "resid_pre" in capsys.readouterr().err


def test_flags_fire_where_attention_saturates():
    """Sharpened queries and keys saturate every layer-0 softmax: patching a key moves the pattern a lot
    while the gradient through the saturated softmax is ~0, so AtP misses it, and the report says why."""
    model = tiny_model("gpt2")
    with torch.no_grad():
        d = model.config.n_embd
        model.transformer.h[0].attn.c_attn.weight[:, : 2 * d] *= 25.0  # q and k columns of every head
    pairs = random_pairs(n=4, changed=(2,))
    result = screen(model, ap.make_batch(pairs), ScreenConfig(sites=("k", "q"), top_k=None, random_k=0,
                                                              progress=False))
    layer0 = [c for c in result.components if c["layer"] == 0]
    assert max(c["evidence"]["attn_max_prob"] for c in layer0) > 0.95
    missed = [c for c in layer0 if {"large_error", "missed", "sign_flip"} & set(c["flags"])]
    assert missed, "AtP should disagree with exact patching on a saturated head"
    assert any("attention saturation" in cause for c in missed for cause in c["causes"])
    worst = max(missed, key=lambda c: abs(c["exact"]))
    assert abs(worst["approx"]) < 0.5 * abs(worst["exact"])


def test_estimator_all_verifies_the_union_and_grades_each(tmp_path):
    model, folder = _save_model(tmp_path, "llama")
    pairs = random_pairs(n=3)
    task = _write_task(tmp_path / "task.jsonl", pairs)
    out = tmp_path / "run"
    main(["screen", "--model", str(folder), "--task", str(task), "--out", str(out), "--quiet", "--no-figures",
          "--top-k", "3", "--random-k", "2", "--sites", "head,k", "--estimator", "all", "--ig-steps", "2"])
    report = json.loads((out / "report.json").read_text())
    per = report["estimators"]["denoise"]
    assert set(per) == {"atp", "atp_star", "ig", "graddrop", "relp", "gim", "relp_gim", "relp_t4"}
    assert per["ig"]["cost"]["backward"] == 2 * len(ap.METRICS)
    verified = {c["name"] for c in report["components"] if c["site"] == "head"}
    batch = ap.make_batch(pairs)
    for est in per:  # every estimator's top-3 heads were verified
        scores = ap.attribute(model, batch, sites=["head"], estimator=est, ig_steps=2)
        per_head = scores.values["logit_diff"]["head"].sum(1).flatten()  # [layer * head]
        top = torch.argsort(per_head.abs(), descending=True)[:3].tolist()
        assert {f"L{i // 4}H{i % 4}" for i in top} <= verified, est
        assert 0 <= per[est]["sites"]["head"]["recall_at_k"] <= 1
    assert "Which estimator to trust here" in (out / "report.md").read_text()


def test_cli_gaussian_noise_corruption(tmp_path):
    _, folder = _save_model(tmp_path)
    task = _write_task(tmp_path / "task.jsonl", random_pairs(n=3))
    out = tmp_path / "run"
    main(["screen", "--model", str(folder), "--task", str(task), "--out", str(out), "--quiet", "--no-figures",
          "--top-k", "2", "--random-k", "1", "--sites", "resid_pre,head", "--corruption", "noise"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corruption"] == {"method": "noise", "noise_std": 3.0}
    report = json.loads((out / "report.json").read_text())
    assert report["corrupt_metric"]["logit_diff"] != report["clean_metric"]["logit_diff"]
