"""The memory tracker (engine/memory.py) and the memory plan (planning.py, ``attrpatch plan``)."""

import json
from pathlib import Path

import pytest
import torch

from attrpatch.cli import main
from attrpatch.config import ScreenConfig
from attrpatch.engine.memory import MemoryTracker
from attrpatch.inputs.batch import make_batch
from attrpatch.planning import meta_model, model_config, parse_bytes, synthetic_batch, trace_screen
from conftest import random_pairs, tiny_model

CONFIGS = Path(__file__).parent / "configs"
SMALL = ScreenConfig(top_k=4, random_k=2, copies=4, metrics=("logit_diff", "kl"), progress=False)


def test_tracker_counts_a_known_allocation_exactly_and_its_views_once():
    with MemoryTracker() as tracker:
        x = torch.empty(1000)  # float32: 4000 bytes
        y, z = x[10:], x.view(10, 100)
        assert tracker.live_bytes == 4000
        w = torch.empty(250, dtype=torch.float64)
        assert tracker.live_bytes == 6000
    assert tracker.summary()["peak_bytes"] == 6000
    assert tracker.summary()["largest"]["bytes"] == 4000
    del x, y, z, w


def test_freeing_is_tracked_and_the_peak_stays():
    with MemoryTracker() as tracker:
        x = torch.empty(1000)
        y = x[1:]
        del x
        assert tracker.live_bytes == 4000  # a view keeps the storage
        del y
        assert tracker.live_bytes == 0
        torch.empty(10)  # freed at once
    assert tracker.live_bytes == 0 and tracker.summary()["peak_bytes"] == 4000


def test_phases_have_their_own_peaks_per_device():
    with MemoryTracker() as tracker:
        with tracker.phase("a"):
            x = torch.empty(1000)
            del x
        with tracker.phase("b"):
            keep = torch.empty(200, device="meta")
    phases = tracker.summary()["phases"]
    assert phases["a"]["peak_bytes"] == 4000 and phases["a"]["end_bytes"] == 0
    assert phases["b"]["peak_bytes"] == 800 and phases["b"]["devices"] == {"meta": 800}
    assert tracker.summary()["devices"] == {"cpu": 4000, "meta": 800}
    del keep


def test_weights_count_from_the_start_and_ops_on_them_allocate_only_their_outputs():
    model = torch.nn.Linear(10, 20)  # 200 + 20 floats
    tracker = MemoryTracker(model)
    assert tracker.weights_bytes == 880
    x = torch.ones(3, 10)  # made before tracking: not counted
    with tracker:
        out = model(x)  # the transposed weight is a view: only the [3, 20] output counts
    assert tracker.summary()["peak_bytes"] == 880 + 240
    del out


def test_value_reads_of_meta_tensors_are_answered():
    with MemoryTracker():
        mask = torch.ones(2, 3, dtype=torch.long, device="meta")
        assert bool(mask.all()) is True
        assert int(mask.sum()) == 0
        assert mask.nonzero().shape == (1, 2)
        assert torch.equal(mask.cpu(), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # sdpa (fused on meta) and eager attention
def test_plan_on_meta_agrees_with_the_measured_run_within_10_percent(family):
    model = tiny_model(family)
    batch = make_batch(random_pairs(4, changed=(0, 3)))  # differ from position 0: no shared prefix, as planned
    measured = trace_screen(model, batch, SMALL)
    planned = trace_screen(meta_model(model.config), synthetic_batch(4, batch.n_pos), SMALL)
    assert planned["weights_bytes"] == measured["weights_bytes"]
    for phase in ("attribution", "verification"):
        real, plan = measured["phases"][phase]["peak_bytes"], planned["phases"][phase]["peak_bytes"]
        assert abs(plan - real) <= 0.1 * real, (phase, plan, real)
        assert plan > measured["weights_bytes"]  # something beyond the weights was traced


def test_low_memory_attribution_plans_less():
    model = meta_model(tiny_model("llama").config)
    batch = synthetic_batch(4, 7)
    plain = trace_screen(model, batch, SMALL, phases=("attribution",))["peak_bytes"]
    low = trace_screen(model, batch, ScreenConfig(**{**SMALL.__dict__, "low_memory": True}),
                       phases=("attribution",))["peak_bytes"]
    assert low < plain


def test_cli_json_has_the_plan_keys(capsys):
    code = main(["plan", "--n-prompts", "2", "--seq-len", "6", "--sites", "head,mlp_out", "--top-k", "2",
                 "--random-k", "1", "--max-memory", "1GB", "--json"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"peak_bytes", "weights_bytes", "phases", "settings"} <= set(plan)
    assert {"load", "attribution", "verification"} <= set(plan["phases"])
    assert plan["phases"]["attribution"]["peak_bytes"] > plan["weights_bytes"] > 0
    assert plan["settings"]["seq_len"] == 6 and plan["fits"] is True


def test_cli_text_says_what_does_not_fit(capsys):
    code = main(["plan", "--n-prompts", "2", "--seq-len", "6", "--sites", "head", "--top-k", "2",
                 "--random-k", "1", "--max-memory", "10kB"])
    out = capsys.readouterr().out
    assert code == 0 and "does NOT fit" in out and "the weights alone do not fit" in out


def test_config_without_seq_len_is_refused_with_the_fix(capsys):
    assert main(["plan", "--config", str(CONFIGS / "llama-3-8b.json")]) == 2
    assert "pass --seq-len" in capsys.readouterr().err


def test_memory_sizes_parse_and_bad_ones_name_the_units():
    assert parse_bytes("24GB") == 24 * 10**9 and parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1e6") == 10**6
    with pytest.raises(ValueError, match="expected a number and a unit.*GIB"):
        parse_bytes("24 gigs")


@pytest.mark.parametrize("name, params", [("llama-3-8b", 8.030e9), ("qwen2.5-7b", 7.616e9), ("gemma-2-9b", 9.242e9)])
def test_shipped_configs_have_the_public_parameter_counts(name, params):
    model = meta_model(model_config(config_file=str(CONFIGS / f"{name}.json")), "bfloat16")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-3)
