"""Figures of a screen run: every figure renders, and what is plotted equals the report's numbers (read
back from the matplotlib objects, not from pixels)."""

import ast
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from attrpatch import plot  # noqa: E402
from attrpatch.cli import main  # noqa: E402
from attrpatch.config import ScreenConfig  # noqa: E402
from attrpatch.output.report import load_scores  # noqa: E402
from attrpatch.pipeline import run_screen  # noqa: E402

from conftest import tiny_model  # noqa: E402

SITES = ("resid_pre", "attn_out", "mlp_out", "head", "neuron")
STEMS = ["positions_denoise", "heads_denoise", "scatter_denoise", "metrics_denoise", "cost_recall_denoise",
         "positions_noise", "heads_noise", "scatter_noise", "metrics_noise", "cost_recall_noise", "directions"]


def _screen(out, **config):
    model = tiny_model("gpt2")
    run_screen(model, None, task="induction", config=ScreenConfig(progress=False, **config), out=out,
               model_name="tiny-gpt2", n_prompts=4, figures=False)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Both directions, every site, every estimator, exhaustive: every figure applies and has a complete
    ground truth."""
    return _screen(tmp_path_factory.mktemp("run"), sites=SITES, direction="both", top_k=None, random_k=0,
                   estimator="all", ig_steps=2)


@pytest.fixture(scope="module")
def partial_dir(tmp_path_factory):
    """One direction, the top 3 plus 2 random controls per site (no verification budget): most cells unverified."""
    return _screen(tmp_path_factory.mktemp("partial"), sites=("resid_pre", "head"), direction="denoise",
                   top_k=3, random_k=2, verify_budget=0)


@pytest.fixture(scope="module")
def report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def scores(run_dir):
    return {k: v.numpy() for k, v in load_scores(run_dir / "scores.safetensors")[0].items()}


@pytest.fixture(scope="module")
def run(run_dir):
    return plot.load_run(run_dir)


def _comps(report, direction, site=None):
    return [c for c in report["components"] if c["direction"] == direction and site in (None, c["site"])]


def _close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=rtol, atol=atol)


def test_draw_run_writes_every_figure(run_dir):
    paths = plot.draw_run(run_dir, formats=("png",))
    assert paths == [run_dir / "figures" / f"{s}.png" for s in STEMS]
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000 and data[:4] == b"\x89PNG", p


def test_cli_figures(partial_dir, capsys):
    assert main(["figures", str(partial_dir), "--format", "png"]) == 0
    written = sorted((partial_dir / "figures").iterdir())
    stems = ("positions_denoise", "heads_denoise", "scatter_denoise", "metrics_denoise", "cost_recall_denoise")
    assert [p.name for p in written] == sorted(f"{s}.png" for s in stems)
    for p in written:
        data = p.read_bytes()
        assert len(data) > 1000 and data[:4] == b"\x89PNG", p
    assert str(written[0]) in capsys.readouterr().out


def test_png_alone_by_default_pdf_on_request(run_dir, tmp_path, capsys):
    """Each format is a full render, so the default is png alone; --format png,pdf adds the pdf."""
    assert [p.suffix for p in plot.draw_run(run_dir, out=tmp_path / "default")] == [".png"] * len(STEMS)
    assert main(["figures", str(run_dir), "--format", "png,pdf"]) == 0
    written = sorted(p.name for p in (run_dir / "figures").iterdir())
    assert {f"{s}.pdf" for s in STEMS} | {f"{s}.png" for s in STEMS} <= set(written)
    capsys.readouterr()


def test_same_bytes_on_redraw(run, tmp_path):
    first = plot.save(plot.plot_directions(run), tmp_path / "a" / "directions", ("png", "pdf"))
    second = plot.save(plot.plot_directions(run), tmp_path / "b" / "directions", ("png", "pdf"))
    for p, q in zip(first, second):
        data = p.read_bytes()
        assert len(data) > 1000 and data == q.read_bytes(), p.name
    assert [p.read_bytes()[:4] for p in first[:2]] == [b"\x89PNG", b"%PDF"]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_positions_heatmaps_show_scores_and_exact(run, report, scores, direction):
    fig = plot.plot_positions(run, direction)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6  # (AtP, exact) x (resid_pre, attn_out, mlp_out)
    for i, site in enumerate(("resid_pre", "attn_out", "mlp_out")):
        atp, exact = panels[2 * i].images[0], panels[2 * i + 1].images[0]
        _close(atp.get_array(), scores[f"{direction}/logit_diff/{site}"])
        grid = exact.get_array()
        comps = _comps(report, direction, site)
        assert len(comps) == grid.size and not np.ma.getmaskarray(grid).any()
        for c in comps:
            _close(grid[c["layer"], c["pos"]], c["exact"])
            _close(atp.get_array()[c["layer"], c["pos"]], c["approx"])
        assert atp.norm.vmin == -atp.norm.vmax and exact.norm.vmax == atp.norm.vmax  # shared, centred
    tokens = [t.get_text() for t in panels[-1].get_xticklabels()]
    assert tokens == [t.strip() for t in report["tokens"]]


def test_heads_heatmap_shows_atp_exact_and_difference(run, report, scores):
    fig = plot.plot_heads(run, "denoise")
    atp, exact, diff = (ax.images[0].get_array() for ax in fig.axes if ax.images)
    _close(atp, scores["denoise/logit_diff/head"].sum(1))
    comps = _comps(report, "denoise", "head")
    assert len(comps) == exact.size
    for c in comps:
        _close(exact[c["layer"], c["head"]], c["exact"])
        _close(atp[c["layer"], c["head"]], c["approx"])
        _close(diff[c["layer"], c["head"]], c["exact"] - c["approx"])
    labels = {ax.get_ylabel() for ax in fig.axes if not ax.images}  # the colour bars
    assert "Δ logit diff" in labels and "error of AtP" in labels


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_scatter_plots_approx_against_exact(run, report, direction):
    fig = plot.plot_scatter(run, direction)
    panels = [ax for ax in fig.axes if ax.collections]
    assert len(panels) == len(SITES)
    for ax, site in zip(panels, SITES):
        comps = _comps(report, direction, site)
        _close(ax.collections[0].get_offsets(), [(c["approx"], c["exact"]) for c in comps])
        r = report["agreement"][direction][site]["logit_diff"]["pearson"]
        assert ax.get_title(loc="left") == f"{site}  (n={len(comps)}, r={r:.2f})"
        flagged = {plot._short(c) for c in comps if set(c["flags"]) & set(plot.DISAGREE)}
        names = {t.get_text() for t in ax.texts if not t.get_text().startswith("+")}
        assert names <= flagged and (names or not flagged)
        assert any(abs(line.get_slope() - 1) < 1e-12 for line in ax.lines if hasattr(line, "get_slope"))


def test_metric_comparison_plots_normalised_effects(run, report):
    fig = plot.plot_metrics(run, "denoise")
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_yticklabels()]
    by_name = {c["name"]: c for c in _comps(report, "denoise")}
    rows = ax.get_yticks()
    disagree = [c for c in _comps(report, "denoise") if "metrics_disagree" in c["flags"]]
    expected_rows = min(16, len(disagree) + 4) if disagree else 16
    assert len(names) == expected_rows and len(ax.collections) == len(report["metrics"])
    flagged_rows = [n for n in names if "metrics_disagree" in by_name[n]["flags"]]
    assert flagged_rows == names[:len(flagged_rows)] and len(flagged_rows) == min(len(disagree), 16)
    for coll, m in zip(ax.collections, report["metrics"]):
        offsets = coll.get_offsets()
        _close(offsets[:, 1], rows)
        expected = [by_name[n]["exact_norm"][m] for n in names]
        _close(offsets[:, 0], [math.nan if v is None else v for v in expected])
    for tick in ax.get_yticklabels():
        disagree = "metrics_disagree" in by_name[tick.get_text()]["flags"]
        assert (tick.get_fontweight() == "bold") == disagree


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_cost_recall_curves(run, report, scores, direction):
    fig = plot.plot_cost_recall(run, direction)
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == len(SITES)
    for ax, site in zip(panels, SITES):
        comps = _comps(report, direction, site)
        shape = scores[f"{direction}/logit_diff/{site}"].shape
        total = shape[0] * (shape[1] if report["positions"][site] == "each" else 1) * (
            shape[2] if len(shape) > 2 else 1)
        assert len(comps) == total  # exhaustive
        n = plot.top_n(run, site, direction)
        truth = sorted(comps, key=lambda c: -abs(c["exact"]))[:n]
        atp, rand, exhaustive = ax.lines[:3]
        xs, ys = atp.get_xdata(), atp.get_ydata()
        for x, y in zip(xs[:-1], ys[:-1]):
            assert y == pytest.approx(sum(c["rank_approx"] <= x for c in truth) / n)
        full = max(c["rank_approx"] for c in truth)
        assert xs[np.argmax(ys >= 1)] == full
        _close(rand.get_ydata(), rand.get_xdata() / total)
        assert list(exhaustive.get_xdata()) == [total, total]
        estimators = list(comps[0]["approx_estimators"])
        assert estimators[0] == "atp" and len(estimators) > 1
        others = [ln for ln in ax.lines[3:] if ln.get_label().endswith(" order")]
        for est, line in zip(estimators[1:], others, strict=True):  # one more curve per estimator
            order = sorted(comps, key=lambda c: -abs(c["approx_estimators"][est]))
            rank = {c["name"]: i + 1 for i, c in enumerate(order)}
            for x, y in zip(line.get_xdata()[:-1], line.get_ydata()[:-1]):
                assert y == pytest.approx(sum(rank[c["name"]] <= x for c in truth) / n)
            assert line.get_label() == f"{plot.ESTIMATOR_LABELS[est]} order"


def test_directions_scatter(run, report):
    fig = plot.plot_directions(run)
    ax = fig.axes[0]
    assert len(ax.collections) == len(SITES)
    for coll, site in zip(ax.collections, SITES):
        noise = {c["name"]: c for c in _comps(report, "noise", site)}
        pairs = [(c, noise[c["name"]]) for c in _comps(report, "denoise", site)]
        assert coll.get_label() == site
        _close(coll.get_offsets(), [(d["exact_norm"]["logit_diff"], -n["exact_norm"]["logit_diff"])
                                    for d, n in pairs])


def test_partial_run_masks_unverified_cells(partial_dir):
    run = plot.load_run(partial_dir)
    report = run.report
    exact = plot.plot_positions(run).axes[1].images[0].get_array()
    comps = _comps(report, "denoise", "resid_pre")
    verified = np.zeros(exact.shape, bool)
    for c in comps:
        verified[c["layer"], c["pos"]] = True
        _close(exact[c["layer"], c["pos"]], c["exact"])
    assert (np.ma.getmaskarray(exact) == ~verified).all() and verified.sum() == 5
    scatter = plot.plot_scatter(run).axes[0].collections[0]
    colors = [tuple(np.round(fc, 3)) for fc in scatter.get_facecolors()]
    grey = tuple(np.round(matplotlib.colors.to_rgba(plot.CONTROL_C), 3))
    flagged = [bool(set(c["flags"]) & set(plot.DISAGREE)) for c in comps]
    assert [col == grey for col in colors] == [c["selected"] == "control" and not f for c, f in zip(comps, flagged)]


def test_plot_functions_draw_into_given_axes(run):
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.subplots()
    assert plot.plot_directions(run, ax=ax) is fig and ax.collections
    fig2 = Figure()
    axes = fig2.subplots(1, 3)
    assert plot.plot_heads(run, ax=axes) is fig2
    with pytest.raises(ValueError, match="3 panel"):
        plot.plot_heads(run, ax=axes[:2])


def test_matplotlib_is_imported_lazily():
    """No module-level matplotlib import (so importing attrpatch sets no backend and no style)."""
    files = sorted(Path(plot.__file__).parent.glob("*.py"))
    assert len(files) > 1  # the package's modules, not only its __init__
    for path in files:
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.startswith("matplotlib")], path


def test_scatter_labels_neither_overlap_nor_cover_a_point(run, report):
    """Measured with the renderer's text extents after the figure is drawn: no two label boxes (the corner
    note counted) intersect, and none covers a drawn point."""
    from attrpatch.plot.labels import covers, intersect, label_boxes, point_discs, renderer_of

    for direction in ("denoise", "noise"):
        fig = plot.plot_scatter(run, direction, max_labels=8)
        renderer_of(fig)
        fig.canvas.draw()
        named = 0
        for ax in fig.axes:
            boxes = label_boxes(ax) + [tuple(t.get_window_extent().extents) for t in ax.texts
                                       if not hasattr(t, "xyann")]
            named += len(label_boxes(ax))
            assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[:i] if intersect(a, b)]
            assert not [(b, d) for b in boxes for d in point_discs(ax) if covers(b, (d[0], d[1], d[2] / 2))]
        assert named or not any(set(c["flags"]) & set(plot.DISAGREE) for c in _comps(report, direction))


def test_every_figure_names_model_task_direction_and_metric(run):
    for stem, fig in plot.figures(run):
        legends = [t.get_text() for lg in fig.legends for t in [lg.get_title()]]
        titles = [fig._suptitle.get_text()] if fig._suptitle else []
        text = " ".join(titles + legends).replace(":\n", ": ")  # a single column wraps after the task
        direction = "denoising vs noising" if stem == "directions" else \
            ("denoising" if stem.endswith("denoise") else "noising")
        assert f"tiny-gpt2, induction: {direction}, " in text, (stem, text)
        assert ("every metric" if stem.startswith("metrics") else "logit diff") in text, (stem, text)


def test_circuit_graph_of_a_30_layer_model_is_sized_to_its_layers_and_its_legend_matches_its_colours():
    from matplotlib.colors import to_hex

    from attrpatch.plot.circuit import NEG_C, POS_C, ROW_H, circuit_rows, plot_circuit
    from attrpatch.plot.circuit_layout import MAX_CIRCUIT_EDGES

    layers = (0, 3, 17, 20, 23, 29)
    edges = [{"sender": f"L{a}H{i % 9}", "receiver": f"L{b}H{(i + 1) % 9}.v", "score": (-1) ** i * (1 + i / 10)}
             for i, (a, b) in enumerate(zip(layers * 8, layers[1:] * 8)) if a < b]
    edges += [{"sender": "L29.mlp", "receiver": "logits", "score": 2.0}, {"sender": "embed", "receiver": "L0.mlp",
                                                                          "score": -0.5}]
    circuit = {"edges": edges, "n_edges": 30000, "smallest_faithful": 200}
    report = {"model": "/cache/smollm2-135m-instruct", "task": "ioi", "directions": ["denoise"],
              "metric": "logit_diff", "edges": []}
    fig = plot_circuit(circuit, report)
    shown = min(MAX_CIRCUIT_EDGES, len(edges))
    rows = circuit_rows(edges[:shown])
    assert sorted(rows) == [-1, *layers, 30]  # embed, the layers holding a node, logits: nothing else
    assert fig.get_figheight() == pytest.approx(ROW_H * len(rows) + 1.0) and fig.get_figheight() < 5
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["embed", *(f"L{la}" for la in layers), "logits"]
    drawn = {to_hex(a.arrow_patch.get_edgecolor(), keep_alpha=False) for a in ax.texts if hasattr(a, "arrow_patch")
             and a.arrow_patch is not None}
    legend = {t.get_text(): to_hex(h.get_color()) for t, h in zip(fig.legends[0].get_texts(),
                                                                  fig.legends[0].legend_handles)}
    assert drawn == {POS_C.lower(), NEG_C.lower()}
    assert legend == {"positive edge score": POS_C.lower(), "negative edge score": NEG_C.lower()}
    assert "smollm2-135m-instruct, ioi: denoising, logit diff" in ax.get_title(loc="left")


def test_two_processes_draw_the_same_files_in_order(run_dir, tmp_path):
    """draw_run(processes=2) draws every other figure in a forked process: the same paths in the same order,
    byte for byte the same files (fixed metadata) as one process."""
    one = plot.draw_run(run_dir, out=tmp_path / "one", processes=1)
    two = plot.draw_run(run_dir, out=tmp_path / "two", processes=2)
    assert [p.name for p in two] == [p.name for p in one] == [f"{s}.png" for s in STEMS]
    assert [p.read_bytes() for p in two] == [p.read_bytes() for p in one]


def test_per_position_circuit_is_a_grid_of_positions_with_the_attention_links_its_edges_imply():
    """--positions each: one column per position holding a node, headed by its token; every edge stays in its
    column; a head whose k/v input at p and whose write at a later q are both in the circuit gets a dashed link
    p -> q, and no other head does."""
    from attrpatch.plot.circuit import plot_circuit
    from attrpatch.plot.position_circuit import _xy, attention_links, position_label, position_layout

    edges = [{"sender": "embed", "receiver": "L0.mlp", "score": -3.0, "pos": 2},
             {"sender": "L0.mlp", "receiver": "L2H1.k", "score": 1.5, "pos": 2},
             {"sender": "L0.mlp", "receiver": "L2H0.v", "score": 0.5, "pos": 2},
             {"sender": "L2H1", "receiver": "logits", "score": 2.0, "pos": 4},
             {"sender": "L1H3", "receiver": "L2H0.q", "score": -0.7, "pos": 4},  # L2H0 writes nowhere: no link
             {"sender": "L0H0", "receiver": "L1H3.v", "score": 0.1, "pos": 4}]  # its key is its query: no link
    circuit = {"edges": edges, "n_edges": 500, "smallest_faithful": 6, "positions": "each"}
    report = {"model": "/m/tiny", "task": "ioi", "directions": ["noise"], "metric": "logit_diff", "edges": [],
              "tokens": ["When", "IO", "S1", " went", "END"]}
    columns, slots, rows = position_layout(edges)
    assert columns == [2, 4] and slots == [0, 1, 3] and sorted(rows) == [-1, 0, 1, 2, 3]
    assert attention_links(edges) == [("L2H1", 2, 4)]  # k at S1 (2) read by its write at END (4)
    assert position_label(2, report["tokens"]) == "S1 @2" and position_label(7, None) == "@7"
    for e in edges:  # an edge joins two nodes of one column
        x0, _ = _xy(e["sender"], e["pos"], columns, slots, rows)
        x1, _ = _xy(e["receiver"].rsplit(".", 1)[0] if "H" in e["receiver"] else e["receiver"], e["pos"], columns,
                    slots, rows)
        width = len(slots) + 1.6
        assert int((x0 + 0.8) // width) == int((x1 + 0.8) // width) == columns.index(e["pos"])
    fig = plot_circuit(circuit, report)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["S1 @2", "END @4"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["embed", "L0", "L1", "L2", "logits"]
    dashed = [a for a in ax.texts if getattr(a, "arrow_patch", None) is not None
              and a.arrow_patch.get_linestyle() not in ("-", "solid")]
    assert len(dashed) == 1
    assert "per-position edges" in ax.get_title(loc="left")
