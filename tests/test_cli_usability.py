"""What a new user meets at the command line: defaults in --help, a plain error for a bad --out, a Ctrl-C that
says what was saved and how to continue, the GGUF path from `attrpatch fetch`, and a JSON error shown in place."""

import pytest

from attrpatch.cli import main
from attrpatch.inputs.pairs import load_jsonl
from conftest import random_pairs, saved_model, write_task


@pytest.mark.parametrize("command, shown", [
    ("screen", ["(default: runs/screen)", "(default: 30)", "(default: 20)", "(default: 0)", "--copies"]),
    ("edges", ["(default: runs/edges)", "(default: both)", "(default: 50)", "(default: 30)"]),
    ("figures", ["(default: png)"]),
])
def test_help_shows_every_default(command, shown, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for needle in shown:
        assert needle in text, needle
    assert "(default: None)" not in text and "(default: False)" not in text


def test_out_naming_a_file_is_refused_before_any_work(tmp_path, capsys):
    existing = tmp_path / "existing_file.txt"
    existing.write_text("keep me")
    code = main(["screen", "--task", "no-such-task.jsonl", "--out", str(existing), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {existing} is a file; give a folder" in err and "Traceback" not in err
    assert existing.read_text() == "keep me"


def test_ctrl_c_names_the_saved_steps_and_the_resume_command(tmp_path, capsys, monkeypatch):
    """Interrupted after the first saved step: the message names it and the exact command with --resume."""
    _, folder = saved_model(tmp_path / "model", "gpt2")
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=3))
    out = tmp_path / "run"
    import attrpatch.output.checkpoint as checkpoint
    save = checkpoint.Progress._save

    def interrupt_after_first(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.Progress, "_save", interrupt_after_first)
    argv = ["screen", "--model", str(folder), "--task", str(task), "--out", str(out), "--quiet", "--no-figures",
            "--sites", "head", "--top-k", "2", "--random-k", "1"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    saved = sorted(p.stem for p in (out / ".progress").glob("*.safetensors"))
    assert len(saved) == 1 and f"interrupted after 1 saved step(s) in {out}/.progress (last: {saved[0]})" in err
    assert "attrpatch " + " ".join(argv) + " --resume" in err and "Traceback" not in err
    monkeypatch.setattr(checkpoint.Progress, "_save", save)
    assert main(argv + ["--resume"]) == 0  # the command it prints continues the run
    capsys.readouterr()


def test_ctrl_c_in_a_command_without_resume_says_so(monkeypatch, capsys):
    import attrpatch.model.fetch as fetch

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(fetch, "fetch", interrupted)
    assert main(["fetch", "smollm2"]) == 130
    assert "keeps no partial results" in capsys.readouterr().err


def test_fetch_gguf_prints_the_cached_file(tmp_path, capsys):
    """--gguf prints the GGUF file in the cache given (here one already there: no download)."""
    from attrpatch.model.fetch import GGUF_NAME
    (tmp_path / GGUF_NAME).write_bytes(b"GGUF")
    assert main(["fetch", "smollm2", "--gguf", "--cache", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / GGUF_NAME)


def test_bad_json_shows_the_line_with_a_caret_at_the_error(tmp_path):
    line = ('{"clean": "When Mary and John went to the store, John gave a drink to", "corrupt": "When Mary and '
            'John went to the store, Mary gave a drink to" "answer": " Mary", "wrong": " John"}')
    (tmp_path / "bad.jsonl").write_text("\ufeff" + line + "\n")  # with a byte-order mark, as some editors save
    with pytest.raises(ValueError) as err:
        load_jsonl(tmp_path / "bad.jsonl")
    message = str(err.value)
    assert "bad.jsonl:1: invalid JSON: Expecting ',' delimiter at column 145" in message
    excerpt, caret = message.splitlines()[-2:]
    assert excerpt[caret.index("^"):].startswith('"answer"')
