"""Sliding-window patching: windows of 1 are single layers, a window's exact effect is a naive joint patch,
its AtP the sum of its layers' scores."""

import pytest
import torch

import attrpatch as ap
from attrpatch.methods.patching.windows import sweep_windows, window, windows
from conftest import random_pairs, tiny_model
from reference import patched_logits_reference

METRICS = ["logit_diff", "prob", "rank", "accuracy"]


def test_windows_are_centred_and_clipped_at_the_ends():
    layers = lambda item: [c.layer for c in item]  # noqa: E731
    assert [layers(w) for w in windows("mlp_out", 3, 4)] == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3]]
    assert [layers(w) for w in windows("mlp_out", 5, 3)] == [[0, 1, 2]] * 3
    assert layers(window("resid_pre", 1, 2, 4)) == [1, 2]
    assert window("head", 2, 1, 4, pos=3, unit=1) == (ap.Component("head", 2, 3, 1),)


@pytest.mark.parametrize("direction", ap.DIRECTIONS)
def test_a_window_of_one_equals_single_layer_patching_and_atp(direction):
    model = tiny_model("llama")
    batch = ap.make_batch(random_pairs(n=3))
    sweep = sweep_windows(model, batch, site="mlp_out", widths=[1], pos=3, metrics=METRICS, direction=direction)
    single = [ap.Component("mlp_out", layer, 3) for layer in range(3)]
    eff = ap.patch(model, batch, single, metrics=METRICS, direction=direction)
    torch.testing.assert_close(sweep.exact[1], eff.values, atol=1e-6, rtol=0)
    scores = ap.attribute(model, batch, sites=["mlp_out"], metrics=METRICS[:2], direction=direction)
    for layer, c in enumerate(single):
        for j, m in enumerate(METRICS[:2]):
            assert float(sweep.atp[1][layer, j]) == pytest.approx(scores.score(c, m), abs=1e-6)
    assert torch.isnan(sweep.atp[1][:, 2:]).all()  # rank, accuracy: no AtP


@pytest.mark.parametrize("family,site,unit", [("gpt2", "resid_pre", None), ("llama", "mlp_out", None),
                                              ("qwen2", "head", 1), ("gpt2", "neuron", 5)])
def test_a_window_exact_effect_equals_a_naive_joint_patch(family, site, unit):
    model = tiny_model(family)
    batch = ap.make_batch(random_pairs(n=3))
    target = ap.Target.from_clean(batch.answer, batch.wrong, patched_logits_reference(model, batch, ())[0])
    pos = None if unit is not None else 3
    sweep = sweep_windows(model, batch, site=site, widths=[3, 2], pos=pos, unit=unit, metrics=METRICS)
    for w in (3, 2):
        for centre, item in enumerate(windows(site, w, 3, pos, unit)):
            receiver, patched = patched_logits_reference(model, batch, item)
            for j, m in enumerate(METRICS):
                naive = float((ap.metric(m, patched, target) - ap.metric(m, receiver, target)).mean())
                assert float(sweep.exact[w][centre, j]) == pytest.approx(naive, abs=1e-4), (w, centre, m)
    scores = ap.attribute(model, batch, sites=[site], metrics=["logit_diff"])
    whole = sum(scores.score(ap.Component(site, layer, pos, unit), "logit_diff") for layer in range(3))
    assert float(sweep.atp[3][1, 0]) == pytest.approx(whole, abs=1e-5)  # the middle window covers every layer
    assert sweep.windows[2] == [[0, 1], [1, 2], [2]]


def test_window_errors_name_the_value_and_the_valid_range():
    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs())
    with pytest.raises(ValueError, match=r"window width 4 out of range: valid 1\.\.3"):
        sweep_windows(model, batch, site="mlp_out", widths=[1, 4])
    with pytest.raises(ValueError, match="'embed' has one layer"):
        sweep_windows(model, batch, site="embed", widths=[1])
    with pytest.raises(ValueError, match="position 9 out of range"):
        sweep_windows(model, batch, site="mlp_out", widths=[1], pos=9)


def test_window_figure_draws_the_normalised_sweep_and_the_same_bytes_twice(tmp_path):
    import json

    import matplotlib
    matplotlib.use("Agg")
    from attrpatch.plot.style import save
    from attrpatch.plot.windows import normalised, plot_windows
    model = tiny_model("gpt2")
    batch = ap.make_batch(random_pairs(n=3))
    sweeps = {"STR": sweep_windows(model, batch, site="mlp_out", widths=[1, 3], pos=3, metrics=METRICS).to_dict()}
    path = tmp_path / "sweeps.json"
    path.write_text(json.dumps(sweeps))
    fig = plot_windows(path)
    lines = fig.axes[0].lines  # width 1 exact, AtP; width 3 exact, AtP; the zero line
    sweep = sweeps["STR"]
    gap = sweep["clean_metric"]["logit_diff"] - sweep["corrupt_metric"]["logit_diff"]
    expected = [row[0] / gap for row in sweep["exact"]["3"]]
    assert list(lines[2].get_ydata()) == pytest.approx(expected)
    assert normalised(sweep, "exact", 3, "logit_diff") == pytest.approx(expected)
    assert list(lines[1].get_ydata()) == pytest.approx([row[0] / gap for row in sweep["atp"]["1"]])
    first, second = save(fig, tmp_path / "a"), save(plot_windows(path), tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_cli_windows_writes_each_corruption_s_sweep_equal_to_the_library(tmp_path, capsys):
    from attrpatch.cli import main
    from attrpatch.prompts import corrupted
    from conftest import write_task
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "model")
    pairs = random_pairs(n=3)
    task = write_task(tmp_path / "task.jsonl", pairs)
    args = ["windows", "--model", str(tmp_path / "model"), "--task", str(task), "--site", "mlp_out", "--window",
            "1,2", "--corruption", "str,noise", "--metrics", "logit_diff,rank", "--quiet", "--out",
            str(tmp_path / "run")]
    assert main([*args, "--position", "3"]) == 0
    assert "noise, window 2: largest exact logit_diff effect" in capsys.readouterr().out
    import json
    sweeps = json.loads((tmp_path / "run" / "windows.json").read_text())
    assert list(sweeps) == ["str", "noise"] and (tmp_path / "run" / "figures" / "windows.png").exists()
    batch = ap.make_batch(pairs)
    for label in ("str", "noise"):
        lib = sweep_windows(model, corrupted(model, batch, label), site="mlp_out", widths=[1, 2], pos=3,
                            metrics=["logit_diff", "rank"])
        for w in (1, 2):
            torch.testing.assert_close(torch.tensor(sweeps[label]["exact"][str(w)]), lib.exact[w], atol=1e-5, rtol=0)
    assert main(args) == 2  # token-id pairs name no roles: the key position must be given
    assert "is neither a token index nor a role of these prompts (roles: none)" in capsys.readouterr().err
