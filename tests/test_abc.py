"""IOI's ABC corruption (S2 becomes a third name) next to the S2 swap (str): the same clean prompts, three
distinct names at IO, S1 and S2, one token each in S2's place; a run with str,abc equals two single runs, and
results.csv names the corruption on every row."""

import csv
import json

import pytest
from transformers import AutoTokenizer

from attrpatch.cli import main
from attrpatch.config import ScreenConfig
from attrpatch.inputs import tasks
from attrpatch.inputs.corruption import check_corruption
from attrpatch.model.loading import DEFAULT_MODEL, load
from attrpatch.pipeline import run_screen
from conftest import random_pairs, write_task

SAME = ("clean_metric", "corrupt_metric", "components", "agreement", "false_negatives", "corruption", "tokens")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.mark.parametrize("template", [None, 0, 5])
def test_abc_pairs_have_three_distinct_names_in_the_str_pairs_positions(tok, template):
    swap = tasks.builtin_task("ioi", tok, n_pairs=40, seed=3, template=template)
    abc = tasks.builtin_task("ioi", tok, n_pairs=40, seed=3, template=template, corruption="abc")
    assert [p.clean_ids for p in abc] == [p.clean_ids for p in swap]  # the same clean prompts
    for s, a in zip(swap, abc):
        roles = a.role_positions
        assert a.roles == s.roles and len(a.corrupt_ids) == len(a.clean_ids) == len(s.corrupt_ids)
        assert (a.answer_id, a.wrong_id) == (s.answer_id, s.wrong_id)
        io, s1, s2 = (tok.decode([a.corrupt_ids[roles[r]]]).strip() for r in ("IO", "S1", "S2"))
        assert len({io, s1, s2}) == 3, a.corrupt  # three different names
        assert tok.decode([s.corrupt_ids[roles["S2"]]]).strip() == io  # the S2 swap repeats the IO name
        changed = [i for i, (x, y) in enumerate(zip(a.clean_ids, a.corrupt_ids)) if x != y]
        assert changed == [roles["S2"]]  # one token, in S2's place


def test_a_run_with_str_and_abc_equals_two_single_runs(tmp_path):
    model, tok = load(None)
    config = ScreenConfig(sites=("attn_out", "head"), top_k=4, random_k=2, direction="both", progress=False)
    options = dict(task="ioi", config=config, model_name="toy", n_prompts=6, figures=False)
    both = run_screen(model, tok, out=tmp_path / "both", corruption="str,abc", **options)
    rows = []
    for label in ("str", "abc"):
        run_screen(model, tok, out=tmp_path / label, corruption=label, **options)
        side, alone = (json.loads((tmp_path / where / "report.json").read_text()) for where in (f"both/{label}", label))
        assert {k: side[k] for k in SAME} == {k: alone[k] for k in SAME}
        assert both["runs"][label]["corruption"]["method"] == label
        found = list(csv.DictReader(open(tmp_path / "both" / label / "results.csv")))
        assert found and {r["corruption"] for r in found} == {label}  # one name on every row
        rows += found
    assert json.loads((tmp_path / "both" / "corruptions.json").read_text())["corruptions"] == ["str", "abc"]
    assert (both["runs"]["str"]["clean_metric"] == both["runs"]["abc"]["clean_metric"]
            and both["runs"]["str"]["corrupt_metric"] != both["runs"]["abc"]["corrupt_metric"])
    assert "S2 becomes a third name" in (tmp_path / "both" / "abc" / "report.md").read_text()
    assert len({tuple(r) for r in rows}) == 1  # the same columns: the two csvs concatenate


def test_abc_is_refused_where_the_task_has_no_third_name(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"task 'facts' has no corruption 'abc' .*its corruptions: str \(the "
                                         r"subject swap\), noise"):
        check_corruption("abc", "facts")
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=3))
    with pytest.raises(ValueError, match="task file .* has no corruption 'abc'.*its corruptions: str .*, noise"):
        check_corruption("abc", str(task))
    assert main(["screen", "--task", "induction", "--corruption", "str,abc", "--out", str(tmp_path / "x")]) == 2
    assert "task 'induction' has no corruption 'abc'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["screen", "--task", "ioi", "--corruption", "str,third"])
    assert "choose from str, abc, noise" in capsys.readouterr().err


def test_report_names_each_built_in_tasks_swap_and_only_those():
    from attrpatch.inputs.corruption import STR_WORDS
    from attrpatch.output.report_md import _corruption_words

    for task, swap in STR_WORDS.items():
        assert f"symmetric token replacement: {swap})" in _corruption_words({"task": task, "corruption": {"method": "str"}})[0]
    line = _corruption_words({"task": "pairs.jsonl", "corruption": {"method": "str"}})[0]
    assert line == "Corruption: `str` (symmetric token replacement)."
