"""Prompts as the model expects them: BOS handling, aligned positions with role labels, the clean-run
check, --keep-correct, and every site x positions combination on every family (the crash of issue 11)."""

import json
import re
import warnings

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer

import attrpatch as ap
from attrpatch.cli import main
from attrpatch.config import ScreenConfig
from attrpatch.inputs.alignment import VARIES, check_one_layout, keep_one_layout, position_labels
from attrpatch.inputs.pairs import PromptPair
from attrpatch.inputs.tasks import IOI_TEMPLATES
from attrpatch.inputs.tokenization import added_bos, bos_id
from attrpatch.model.loading import DEFAULT_MODEL
from attrpatch.screening import screen
from conftest import FAMILIES, random_pairs, tiny_model, write_task


def _toy(tmp_path, add_bos: bool):
    """The embedded toy model and tokenizer in a folder; with add_bos, a tokenizer that puts
    <|endoftext|> (id 0) in front of every text, as Llama 3 and Gemma tokenizers do with their BOS."""
    folder = tmp_path / ("toy-bos" if add_bos else "toy")
    AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    if add_bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok.save_pretrained(folder)
    return folder


def _cli(*argv):
    return main([*map(str, argv), "--quiet", "--no-figures"])


def test_a_tokenizer_that_adds_bos_gets_it_in_the_run_the_positions_and_the_manifest(tmp_path):
    folder = _toy(tmp_path, add_bos=True)
    tok = AutoTokenizer.from_pretrained(folder)
    assert added_bos(tok) == 0 and bos_id(tok, "auto") == 0 and bos_id(tok, "no") is None
    out = tmp_path / "run"
    assert _cli("screen", "--model", folder, "--task", "ioi", "--n-prompts", 4, "--top-k", 2, "--random-k", 1,
                "--out", out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    sel = manifest["prompt_selection"]
    assert sel["bos_id"] == 0 and sel["tokenizer_adds_bos"] is True and sel["prepend_bos"] == "auto"
    assert all(p["clean_ids"][0] == 0 and p["corrupt_ids"][0] == 0 for p in manifest["prompts"])
    assert report["tokens"][0] == "<|endoftext|>"
    # the roles count the BOS position: S2 sits where clean and corrupt differ
    s2 = report["tokens"].index("S2")
    assert all(p["roles"]["S2"] == s2 for p in manifest["prompts"])
    assert all(p["clean_ids"][s2] != p["corrupt_ids"][s2] for p in manifest["prompts"])
    no_bos = tmp_path / "no-bos"
    assert _cli("screen", "--model", folder, "--task", "ioi", "--n-prompts", 4, "--top-k", 2, "--random-k", 1,
                "--out", no_bos, "--prepend-bos", "no") == 0
    prompts = json.loads((no_bos / "manifest.json").read_text())["prompts"]
    assert all(p["clean_ids"][0] != 0 for p in prompts)
    assert json.loads((no_bos / "report.json").read_text())["tokens"].index("S2") == s2 - 1


def test_a_tokenizer_without_bos_gets_none_unless_asked(tmp_path):
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    assert added_bos(tok) is None and bos_id(tok, "auto") is None
    assert bos_id(tok, "yes") == tok.bos_token_id == 0 and bos_id(tok, "<|endoftext|>") == 0
    with pytest.raises(ValueError, match="not one token of this tokenizer"):
        bos_id(tok, "two words")


def test_builtin_ioi_positions_mean_one_role_in_every_prompt(tmp_path):
    """Per-position sites: one template, one layout; the corrupted token (S2) sits at one position in every
    prompt, and the axis is labelled with the roles."""
    out = tmp_path / "run"
    assert _cli("screen", "--model", _toy(tmp_path, add_bos=False), "--task", "ioi", "--n-prompts", 8,
                "--top-k", 2, "--random-k", 1, "--out", out) == 0
    prompts = json.loads((out / "manifest.json").read_text())["prompts"]
    tokens = json.loads((out / "report.json").read_text())["tokens"]
    assert {p["template"] for p in prompts} == {IOI_TEMPLATES[0]}
    differ = {tuple(i for i, (a, b) in enumerate(zip(p["clean_ids"], p["corrupt_ids"])) if a != b) for p in prompts}
    assert len(differ) == 1 and tokens[differ.pop()[0]] == "S2"
    assert {"IO", "S1", "S2", "END"} <= set(tokens)
    assert len({json.dumps(p["roles"], sort_keys=True) for p in prompts}) == 1


def test_misaligned_pairs_are_refused_with_what_to_do(tmp_path, capsys):
    pairs = random_pairs(n=2, changed=(1,)) + random_pairs(n=1, seed=3, changed=(2,))
    folder = tmp_path / "m"
    tiny_model("gpt2").save_pretrained(folder)
    task = write_task(tmp_path / "mis.jsonl", pairs)
    assert _cli("screen", "--model", folder, "--task", task, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "positions mean different tokens" in err and "corrupted positions [1]" in err
    assert "corrupted positions [2]" in err and "--positions all" in err and "Traceback" not in err
    assert _cli("screen", "--model", folder, "--task", task, "--out", tmp_path / "o", "--positions", "all",
                "--top-k", 2, "--random-k", 1) == 0


def test_layout_keeps_the_most_common_and_labels_roles():
    a = PromptPair((5, 6, 7, 8), (5, 9, 7, 8), 1, 2, roles={"S2": 1, "END": 3})
    b = PromptPair((5, 7, 7, 8), (5, 9, 7, 8), 1, 2, roles={"S2": 1, "END": 3})
    c = PromptPair((5, 6, 7, 8), (5, 6, 9, 8), 1, 2, roles={"S2": 2, "END": 3})
    kept, dropped = keep_one_layout([a, c, b])
    assert kept == [a, b] and dropped == 1
    assert position_labels(kept) == ["5", "S2", "7", "END"]
    assert position_labels([a, PromptPair((4, 6, 7, 8), (4, 9, 7, 8), 1, 2, roles={"S2": 1, "END": 3})])[0] == VARIES
    with pytest.raises(ValueError, match="roles S2@1, END@3"):
        check_one_layout([a, c])


def test_clean_run_check_is_reported_and_equals_a_hand_count(tmp_path):
    model = tiny_model("llama")
    pairs = random_pairs(n=6)
    batch = ap.make_batch(pairs)
    with pytest.warns(UserWarning, match="solves only"):  # a random model does not do the task
        result = screen(model, batch, ScreenConfig(sites=("head",), top_k=2, random_k=1, progress=False))
    with torch.no_grad():
        logits = model(batch.clean).logits[:, -1]
    diff = logits[torch.arange(6), batch.answer] - logits[torch.arange(6), batch.wrong]
    assert result.sanity["accuracy"] == pytest.approx(float((diff > 0).double().mean()))
    assert result.sanity["per_pair"] == pytest.approx(diff.tolist(), abs=1e-5)
    assert result.sanity["logit_diff"]["mean"] == pytest.approx(float(diff.mean()), abs=1e-5)


def test_keep_correct_keeps_only_the_pairs_the_model_solves(tmp_path):
    model = tiny_model("gpt2")
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    pairs = random_pairs(n=8)
    task = write_task(tmp_path / "t.jsonl", pairs)
    out = tmp_path / "o"
    assert _cli("screen", "--model", folder, "--task", task, "--out", out, "--keep-correct", "--top-k", 2,
                "--random-k", 1, "--sites", "head") == 0
    with torch.no_grad():
        logits = model(ap.make_batch(pairs).clean).logits[:, -1]
    solved = [logits[i, p.answer_id] > logits[i, p.wrong_id] for i, p in enumerate(pairs)]
    report = json.loads((out / "report.json").read_text())
    assert report["n_prompts"] == sum(solved) and report["sanity"]["accuracy"] == 1.0
    assert report["sanity"]["prompt_selection"]["dropped_unsolved"] == len(pairs) - sum(solved)


@pytest.mark.parametrize("positions", ["each", "all"])
def test_every_site_and_positions_runs_on_every_family(positions):
    """Every site scored per position and at all positions, on every family, through the whole screen
    (attribution, exact patching, diagnostics, findings)."""
    batch = ap.make_batch(random_pairs(n=2))
    for family in FAMILIES:
        config = ScreenConfig(sites=ap.SITES, positions=positions, top_k=2, random_k=1, progress=False,
                              metrics=("logit_diff",))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random models do not do the task: the clean-run check warns
            result = screen(tiny_model(family), batch, config)
        assert {c["site"] for c in result.components} == set(ap.SITES), family
        assert all(c["pos"] is not None for c in result.components) == (positions == "each"), family
        assert all(c["exact"] == c["exact"] for c in result.components), family


BAD_INPUTS = [
    (["screen", "--model", "/no/such/folder"], r"no model folder '/no/such/folder'"),
    (["screen", "--model", "/no/such/model.gguf"], r"no GGUF file"),
    (["screen", "--task", "nope"], r"--task 'nope' is neither a built-in task \(ioi, facts, induction\) nor a file"),
    (["screen", "--template", "99"], r"template 99 out of range for task 'ioi'; its templates are"),
    (["screen", "--template", "x"], r"built-in task 'ioi' takes a template index"),
    (["screen", "--prepend-bos", "two words"], r"not one token of this tokenizer"),
    (["figures", "/"], r"holds no report.json; give the --out folder of a screen run"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS)
def test_user_errors_print_one_line_and_no_traceback(argv, message, capsys):
    assert main([*argv, "--quiet"] if argv[0] == "screen" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("attrpatch: error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="neither a built-in task"):
        main(["screen", "--task", "nope", "--quiet", "--debug"])
