"""Fitting a run into memory: --max-memory chooses settings from the plan (planning.fit, edge_planning.fit_edges)
and the run gives the same effects; a pass that runs out of memory is retried at half the copies, for edges too."""

import re

import pytest
import torch

import attrpatch as ap
from attrpatch.cli import main
from attrpatch.config import EdgeConfig
from attrpatch.config import ScreenConfig
from attrpatch.edge_planning import fit_edges
from attrpatch.methods.edges import patching as edge_patching
from attrpatch.methods.edges.graph import Edge
from attrpatch.planning import fit, plan_screen
from conftest import random_pairs, tiny_model

CONFIG = ScreenConfig(sites=("head", "mlp_out", "resid_pre"), top_k=4, random_k=2, metrics=("logit_diff", "kl"),
                      progress=False)


def test_a_small_max_memory_changes_the_settings_and_the_screen_gives_the_same_effects():
    model = tiny_model("llama")
    batch = ap.make_batch(random_pairs(8, changed=(0, 3)))
    plan = plan_screen(model.config, CONFIG, n_prompts=8, seq_len=batch.n_pos, device="cpu")
    peaks = [plan["phases"][p]["peak_bytes"] for p in ("attribution", "verification")]
    limit = (plan["weights_bytes"] + min(peaks)) // 2  # room for the weights and about half of what runs beside them
    fitted, chosen = fit(model.config, CONFIG, n_prompts=8, seq_len=batch.n_pos, max_memory=limit, device="cpu")
    assert (fitted.batch_size, fitted.copies, fitted.low_memory) != (8, plan["settings"]["copies"], False)
    assert fitted.batch_size < 8 or fitted.copies < plan["settings"]["copies"]
    again = plan_screen(model.config, fitted, n_prompts=8, seq_len=batch.n_pos, device="cpu")
    assert again["peak_bytes"] <= limit < plan["peak_bytes"]
    asked, small = ap.screen(model, batch, CONFIG), ap.screen(model, batch, fitted)
    assert [c["name"] for c in asked.components] == [c["name"] for c in small.components]
    torch.testing.assert_close(torch.tensor([c["exact"] for c in small.components]),
                               torch.tensor([c["exact"] for c in asked.components]), rtol=1e-5, atol=1e-5)
    assert chosen["chosen"]["batch_size"] == fitted.batch_size


def test_a_max_memory_below_the_weights_is_refused_with_the_fix():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="the weights alone take .*--device-map auto"):
        fit(model.config, CONFIG, n_prompts=4, seq_len=7, max_memory=1000, device="cpu")


def test_cli_screen_with_max_memory_prints_what_it_chose(tmp_path, capsys):
    code = main(["screen", "--n-prompts", "4", "--sites", "head", "--top-k", "2", "--random-k", "1", "--metrics",
                 "logit_diff", "--max-memory", "4MB", "--out", str(tmp_path), "--no-figures", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "--max-memory 4.00 MB: chose --batch-size" in out and "did not fit as asked" in out


def test_edges_fit_a_small_max_memory_with_the_same_effects():
    model = tiny_model("llama")
    batch = ap.make_batch(random_pairs(8, changed=(0, 3)))
    config = EdgeConfig(top_k=8, random_k=4, direction="denoise", metrics=("logit_diff",))
    asked, plan = fit_edges(model.config, config, n_prompts=8, seq_len=batch.n_pos, max_memory=10**9, device="cpu")
    phases = plan["phases"]
    limit = (plan["weights_bytes"] + min(phases["edges"]["peak_bytes"], phases["edge_patching"]["peak_bytes"])) // 2
    fitted, _ = fit_edges(model.config, config, n_prompts=8, seq_len=batch.n_pos, max_memory=limit, device="cpu")
    assert (fitted.batch_size, fitted.copies) != (asked.batch_size, asked.copies)
    edges = [Edge("embed", "L0H1.q"), Edge("L0H2", "L1H1.v"), Edge("L1H0", "L1.mlp"), Edge("L2.mlp", "logits")]
    big = edge_patching.patch_edges(model, batch, edges, copies=asked.copies, batch_size=asked.batch_size)
    small = edge_patching.patch_edges(model, batch, edges, copies=fitted.copies, batch_size=fitted.batch_size)
    torch.testing.assert_close(small.values, big.values, rtol=1e-5, atol=1e-6)


def test_out_of_memory_in_edge_patching_halves_the_copies_and_gives_the_same_effects(monkeypatch):
    model = tiny_model("llama")
    batch = ap.make_batch(random_pairs(3))
    edges = [Edge("embed", "L2H1.q"), Edge("L0H2", "L2H1.v"), Edge("L1H0", "L2.mlp"), Edge("L2.mlp", "logits"),
             Edge("L0.mlp", "L2H3.q"), Edge("L1.mlp", "logits")]
    expected = edge_patching.patch_edges(model, batch, edges, copies=8)
    real = edge_patching.run_blocks

    def fragile(spec, start, hidden, calls, n, *args, **kwargs):
        if n > 1:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(spec, start, hidden, calls, n, *args, **kwargs)
    monkeypatch.setattr(edge_patching, "run_blocks", fragile)
    with pytest.warns(UserWarning, match=r"out of memory patching \d edge sets.*retrying with"):
        got = edge_patching.patch_edges(model, batch, edges, copies=8)
    torch.testing.assert_close(got.values, expected.values)
    assert got.passes["patched_rows"] == expected.passes["patched_rows"]



def test_cli_plan_with_edges_says_which_edge_settings_fit(capsys):
    code = main(["plan", "--n-prompts", "4", "--seq-len", "14", "--sites", "head", "--top-k", "3", "--random-k", "1",
                 "--edges", "--max-memory", "5MB"])
    out = capsys.readouterr().out
    assert code == 0 and "does NOT fit" in out
    # settings smaller than the default (batch 4, copies 8) that fit; which ones depends on a few kB of the plan
    # (transformers 4.57 and 5.25 trace 1 and 2 prompts per chunk here)
    chosen = re.search(r"edges: --batch-size (\d+) --copies (\d+): fits", out)
    assert chosen and int(chosen.group(1)) < 4 and int(chosen.group(2)) < 8, out


def test_cli_edges_with_max_memory_prints_what_it_chose(tmp_path, capsys):
    code = main(["edges", "--n-prompts", "4", "--top-k", "4", "--random-k", "2", "--direction", "denoise",
                 "--metrics", "logit_diff", "--circuit-points", "3", "--max-memory", "5MB", "--out", str(tmp_path),
                 "--no-figures", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "--max-memory 5.00 MB: chose --batch-size" in out
