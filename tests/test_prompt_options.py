"""How prompts are chosen and encoded is one typed value, config.PromptOptions: validated when built, built
once by the CLI from the shared options, and passed to run_screen, run_windows and run_edges, which still take
its fields as keywords (the same run either way)."""

import filecmp
import json

import matplotlib
import pytest

matplotlib.use("Agg")

from attrpatch import pipeline  # noqa: E402
from attrpatch.cli import main  # noqa: E402
from attrpatch.cli.args import build_parser, prompts_from  # noqa: E402
from attrpatch.config import EdgeConfig, PromptOptions, ScreenConfig, prompt_options  # noqa: E402
from conftest import random_pairs, tiny_model, write_task  # noqa: E402


@pytest.mark.parametrize("bad, match", [
    (dict(n_prompts=0), r"n_prompts must be an integer >= 1, got 0"),
    (dict(corruption="str"), r"corruption takes a non-empty tuple of names, e.g. \('str',\)"),
    (dict(corruption=()), r"corruption takes a non-empty tuple"),
    (dict(corruption=("str", "nosie")), r"Unknown corruption 'nosie'; known: str"),
    (dict(corruption=("str", "str")), r"names one twice"),
    (dict(noise_std=0.0), r"noise_std must be > 0 .* got 0.0"),
    (dict(prepend_bos=""), r"prepend-bos takes auto, yes, no or a token, got ''"),
    (dict(template=-1), r"template must be a template index >= 0 .* got -1"),
])
def test_bad_prompt_options_are_refused_with_the_value_and_the_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        PromptOptions(**bad)


def test_the_options_are_frozen_and_keyword_only():
    options = PromptOptions(n_prompts=4)
    with pytest.raises(AttributeError):
        options.n_prompts = 8
    with pytest.raises(TypeError):
        PromptOptions(4)


def test_keywords_build_the_same_options_and_both_at_once_are_refused():
    built = prompt_options(None, dict(n_prompts=4, corruption="str, noise", keep_correct=True), "run_screen")
    assert built == PromptOptions(n_prompts=4, corruption=("str", "noise"), keep_correct=True)
    assert prompt_options(None, {}, "run_screen") == PromptOptions()
    assert prompt_options(built, {}, "run_screen") is built
    with pytest.raises(TypeError, match=r"run_screen\(\) takes prompts=PromptOptions\(...\) or the keywords n_prompts"):
        prompt_options(built, dict(n_prompts=4), "run_screen")
    with pytest.raises(TypeError, match=r"run_windows\(\) got unexpected keyword argument\(s\) corruptions; .*"
                                        r"n_prompts, corruption, noise_std"):
        prompt_options(None, dict(corruptions=("str",)), "run_windows")


@pytest.mark.parametrize("argv, expected", [
    (["screen", "--n-prompts", "5", "--corruption", "str,noise", "--noise-std", "2.5", "--prepend-bos", "no",
      "--template", "1", "--keep-correct"],
     PromptOptions(n_prompts=5, corruption=("str", "noise"), noise_std=2.5, prepend_bos="no", template="1",
                   keep_correct=True)),
    (["demo"], PromptOptions()),
    (["edges", "--n-prompts", "6", "--template", "0"], PromptOptions(n_prompts=6, template="0")),
    (["windows", "--corruption", "noise", "--noise-std", "4"], PromptOptions(corruption=("noise",), noise_std=4.0)),
])
def test_the_cli_builds_one_prompt_options_from_every_command(argv, expected):
    assert prompts_from(build_parser().parse_args(argv)) == expected


def test_the_cli_passes_its_prompt_options_to_run_screen(tmp_path, monkeypatch):
    """`attrpatch demo` hands run_screen the PromptOptions of its flags, and none of their fields loose."""
    seen = {}

    def fake(model, tokenizer, **kwargs):
        seen.update(kwargs)
        (kwargs["out"]).mkdir(parents=True, exist_ok=True)
        (kwargs["out"] / "corruptions.md").write_text("# corruptions\n")

    monkeypatch.setattr(pipeline, "run_screen", fake)
    assert main(["demo", "--out", str(tmp_path / "run"), "--n-prompts", "3", "--corruption", "str,noise",
                 "--noise-std", "2.0", "--quiet"]) == 0
    assert seen["prompts"] == PromptOptions(n_prompts=3, corruption=("str", "noise"), noise_std=2.0)
    assert not set(seen) & set(PromptOptions.__dataclass_fields__)


def test_run_screen_with_options_equals_run_screen_with_keywords(tmp_path):
    """The keywords run_screen took before (n_prompts, corruption as "a,b", noise_std, ...) give the same
    files as the PromptOptions they name."""
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=6))
    config = ScreenConfig(sites=("mlp_out", "head"), top_k=3, random_k=2, direction="both", progress=False)
    common = dict(task=str(task), config=config, model_name="tiny", figures=False)
    model = tiny_model("gpt2")
    pipeline.run_screen(model, None, out=tmp_path / "keywords", n_prompts=4, corruption="noise", noise_std=2.0,
                        **common)
    pipeline.run_screen(model, None, out=tmp_path / "options", **common,
                        prompts=PromptOptions(n_prompts=4, corruption=("noise",), noise_std=2.0))
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("keywords", "options"))
    assert a["n_prompts"] == 4 and a["corruption"] == {"method": "noise", "noise_std": 2.0}
    timed = ("timing", "estimators")  # seconds, and each estimator's cost in measured forward-equivalents
    assert {k: v for k, v in a.items() if k not in timed} == {k: v for k, v in b.items() if k not in timed}
    assert a["estimators"]["noise"]["atp"]["sites"] == b["estimators"]["noise"]["atp"]["sites"]
    for name in ("results.csv", "scores.safetensors"):
        assert filecmp.cmp(tmp_path / "keywords" / name, tmp_path / "options" / name, shallow=False)


def test_the_edge_screen_refuses_a_corruption_other_than_the_tasks_own(tmp_path):
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=4))
    with pytest.raises(ValueError, match=r"the edge screen runs on the task's own corrupt prompts \(corruption "
                                         r"str\), got corruption str, noise"):
        pipeline.run_edges(tiny_model("gpt2"), None, task=str(task), config=EdgeConfig(), out=tmp_path / "e",
                           model_name="tiny", prompts=PromptOptions(corruption=("str", "noise")))


def test_windows_runs_on_the_embedded_model_without_model(tmp_path):
    """`attrpatch windows` with no --model names the embedded model (it raised a NameError before)."""
    out = tmp_path / "w"
    assert main(["windows", "--task", "ioi", "--site", "resid_pre", "--window", "1", "--n-prompts", "2",
                 "--no-figures", "--quiet", "--out", str(out)]) == 0
    sweeps = json.loads((out / "windows.json").read_text())
    assert sweeps["str"]["model"].startswith("embedded:")
