"""Discrete metrics in a screen: read from the same patched runs, reported with their caution, never ranked
by; the CLI says why when asked to rank by one."""


import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import attrpatch as ap  # noqa: E402
from attrpatch.cli import main  # noqa: E402
from conftest import random_pairs, tiny_model, write_task  # noqa: E402

METRICS = ("logit_diff", "rank", "accuracy", "top1")


def test_a_screen_reads_discrete_metrics_from_its_patched_runs_and_ranks_by_logit_diff(tmp_path):
    from attrpatch.pipeline import run_screen
    model = tiny_model("llama")
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=4))
    config = ap.ScreenConfig(sites=("resid_pre", "head"), metrics=METRICS, top_k=3, random_k=2, progress=False,
                             direction="both")
    report = run_screen(model, None, task=str(task), config=config, out=tmp_path / "run", model_name="tiny")
    batch = ap.make_batch(random_pairs(n=4))
    for direction in ap.DIRECTIONS:
        comps = [c for c in report["components"] if c["direction"] == direction]
        items = [ap.Component(c["site"], c["layer"], c["pos"], c["head"]) for c in comps]
        eff = ap.patch(model, batch, items, metrics=list(METRICS), direction=direction)
        for c, item in zip(comps, items):
            for m in METRICS:
                assert c["exact_metrics"][m] == pytest.approx(eff.effect(item, m), abs=1e-5), (c["name"], m)
            assert all(c["approx_metrics"][m] != c["approx_metrics"][m] for m in METRICS[1:])  # NaN: no gradient
        assert set(report["agreement"][direction]["head"]) == {"logit_diff"}
    logits = model(input_ids=batch.clean, attention_mask=batch.mask).logits[torch.arange(4), batch.last]
    correct = (logits.gather(1, batch.answer[:, None]) > logits.gather(1, batch.wrong[:, None])).float().mean()
    assert report["clean_metric"]["accuracy"] == pytest.approx(float(correct))
    assert not any("rank" in c["causes"][0] for c in report["components"] if "metrics_disagree" in c["flags"])
    text = (tmp_path / "run" / "report.md").read_text()
    assert "rank, accuracy, top1: discrete (Zhang & Nanda's caution)" in text
    assert (tmp_path / "run" / "figures" / "metrics_denoise.png").exists()


def test_the_cli_refuses_to_rank_by_a_discrete_metric_and_says_why(tmp_path, capsys):
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=3))
    code = main(["screen", "--task", str(task), "--metric", "rank", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0
    assert "attrpatch: error: metric 'rank' is discrete and has no gradient" in err
    assert "use one of logit_diff, logprob, prob, kl to rank" in err
    with pytest.raises(ValueError, match="'accuracy' is discrete"):
        ap.EdgeConfig(metrics=("logit_diff", "accuracy"))
