"""Tests of attrpatch.tasks and of the shipped toy model (offline, a few seconds)."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from attrpatch.inputs import pairs as pair_io
from attrpatch.inputs import tasks
from attrpatch.inputs.pairs import PromptPair
from attrpatch.model.loading import DEFAULT_MODEL as TOY_MODEL_DIR


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOY_MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(TOY_MODEL_DIR).eval()


class SplitLongNames:
    """A word tokenizer that splits words of more than four letters in two tokens."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=True):
        pieces = []
        for word in re.findall(r" ?[A-Za-z']+| ?[^\sA-Za-z]", text):
            letters = word.strip()
            pieces += [word[:-2], word[-2:]] if len(letters) > 4 else [word]
        return {"input_ids": [self.vocab.setdefault(p, len(self.vocab)) for p in pieces]}

    def convert_ids_to_tokens(self, ids):
        inverse = {i: p for p, i in self.vocab.items()}
        return [inverse[i] for i in ids]


def _single_token(text, tok):
    return len(tok(text, add_special_tokens=False)["input_ids"]) == 1


# ---------------------------------------------------------------------------- built-in tasks

@pytest.mark.parametrize("name", tasks.TASKS)
def test_builtin_task_pairs_are_valid_under_toy_tokenizer(name, tok):
    pairs = tasks.builtin_task(name, tokenizer=tok, n_pairs=50, seed=1)
    assert len(pairs) == 50
    for p in pairs:
        assert len(p.clean_ids) == len(p.corrupt_ids)
        assert p.answer_id != p.wrong_id
        assert _single_token(p.answer, tok) and _single_token(p.wrong, tok)
        assert tok(p.clean, add_special_tokens=False)["input_ids"] == list(p.clean_ids)
        assert tok(p.corrupt, add_special_tokens=False)["input_ids"] == list(p.corrupt_ids)
        # symmetric token replacement: the prompts differ in a few positions only
        n_diff = sum(a != b for a, b in zip(p.clean_ids, p.corrupt_ids))
        assert 1 <= n_diff <= 3


def _count(name, text):
    return len(re.findall(rf"\b{name.strip()}\b", text))


def test_ioi_pairs_swap_the_repeated_name():
    for clean, corrupt, answer, wrong in tasks.ioi_texts(30, seed=3):
        # the clean prompt repeats `wrong`; the corrupt prompt repeats `answer`
        assert (_count(wrong, clean), _count(answer, clean)) == (2, 1)
        assert (_count(answer, corrupt), _count(wrong, corrupt)) == (2, 1)


def test_facts_pairs_use_the_knowledge_base():
    prompts = {template.format(s=s): (s, city) for template in tasks.FACT_TEMPLATES
               for s, city in tasks.FACTS}
    for clean, corrupt, answer, wrong in tasks.facts_texts(30, seed=3):
        (subject, city), (other, other_city) = prompts[clean], prompts[corrupt]
        assert (" " + city, " " + other_city) == (answer, wrong) and answer != wrong
        assert len(subject.split()) == len(other.split())


def test_induction_pairs_follow_the_construction():
    n, k = 9, 4
    pairs = tasks.induction_pairs(range(100, 150), 40, seq_len=n, prefix_len=k, seed=2)
    for p in pairs:
        r = p.clean_ids[:n]
        assert len(p.clean_ids) == n + k and len(set(r)) == n
        assert p.clean_ids[n:] == r[:k]
        assert p.answer_id == r[k]
        diff = [i for i in range(n + k) if p.clean_ids[i] != p.corrupt_ids[i]]
        assert diff == [k]
        assert p.corrupt_ids[k] == p.wrong_id and p.wrong_id not in r
        assert all(100 <= i < 150 for i in p.clean_ids + p.corrupt_ids)


def test_induction_without_tokenizer_uses_vocab_size():
    pairs = tasks.builtin_task("induction", n_pairs=5, vocab_size=20)
    assert all(max(p.clean_ids + p.corrupt_ids) < 20 for p in pairs)
    with pytest.raises(ValueError, match="needs a tokenizer or vocab_size"):
        tasks.builtin_task("induction")


@pytest.mark.parametrize("name", tasks.TASKS)
def test_builtin_tasks_are_deterministic_and_seeded(name, tok):
    a = tasks.builtin_task(name, tokenizer=tok, n_pairs=20, seed=5)
    assert a == tasks.builtin_task(name, tokenizer=tok, n_pairs=20, seed=5)
    assert a != tasks.builtin_task(name, tokenizer=tok, n_pairs=20, seed=6)


def _ioi_combo(text):
    """(template index, first name, second name) of an IOI prompt."""
    for t, template in enumerate(tasks.IOI_TEMPLATES):
        pattern = re.escape(template)
        for field in ("A", "B", "S", "place", "object"):
            pattern = pattern.replace(re.escape("{%s}" % field), r"(\w+)" if field in "AB" else r"\w+")
        match = re.fullmatch(pattern, text)
        if match:
            return (t, *match.groups())
    raise AssertionError(text)


def test_splits_are_disjoint():
    ioi = {split: {_ioi_combo(c) for c, *_ in tasks.ioi_texts(400, seed=0, split=split)}
           for split in tasks.SPLITS}
    assert not ioi["train"] & ioi["test"] and len(ioi["test"]) > 100
    facts = {split: {c for c, *_ in tasks.facts_texts(400, seed=0, split=split)} for split in tasks.SPLITS}
    assert not facts["train"] & facts["test"] and len(facts["test"]) > 50
    train = tasks.induction_pairs(range(500), 50, split="train")
    test = tasks.induction_pairs(range(500), 50, split="test")
    assert not {p.clean_ids for p in train} & {p.clean_ids for p in test}


def test_every_fact_is_trained_in_some_template():
    trained = {text for pair in tasks.facts_texts(3000, seed=0, split="train") for text in pair[:2]}
    for subject, _ in tasks.FACTS:
        assert any(f" {subject} in" in text for text in trained), subject


def test_builtin_task_skips_pairs_that_tokenise_badly():
    tokenizer = SplitLongNames()
    pairs = tasks.builtin_task("ioi", tokenizer=tokenizer, n_pairs=20)
    assert len(pairs) == 20
    assert all(len(p.answer.strip()) <= 4 and len(p.wrong.strip()) <= 4 for p in pairs)


def test_builtin_task_errors():
    with pytest.raises(ValueError, match="Unknown task 'ioj'; known: ioi, facts, induction"):
        tasks.builtin_task("ioj")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        tasks.builtin_task("facts")
    with pytest.raises(ValueError, match="Unknown split 'dev'; known: train, test"):
        tasks.ioi_texts(3, split="dev")


# ---------------------------------------------------------------------------- PromptPair, tokenize_pair

def test_prompt_pair_validation():
    pair = PromptPair([1, 2], [1, 3], 4, 5)
    assert pair.clean_ids == (1, 2) and hash(pair)
    with pytest.raises(ValueError, match=r"same token length, got 2 vs 3.*'a b'.*\[1, 2\].*'a b c'"):
        PromptPair((1, 2), (1, 2, 3), 4, 5, clean="a b", corrupt="a b c")
    with pytest.raises(ValueError, match="clean_ids is empty"):
        PromptPair((), (), 4, 5)
    with pytest.raises(TypeError, match="answer_id"):
        PromptPair((1,), (2,), True, 5)
    with pytest.raises(TypeError, match="corrupt_ids"):
        PromptPair((1,), (2.0,), 3, 5)


def test_tokenize_pair(tok):
    pair = pair_io.tokenize_pair("The Louvre is in", "The Prado is in", " Paris", " Madrid", tok)
    assert tok.convert_ids_to_tokens([pair.answer_id, pair.wrong_id]) == [" Paris", " Madrid"]
    assert tok.decode(pair.clean_ids) == "The Louvre is in"


def test_multi_token_answer_error_shows_the_split(tok):
    with pytest.raises(ValueError, match=r"answer ' Big Ben' tokenises into 2 tokens "
                                         r"\[' Big', ' Ben'\]; use a single-token answer"):
        pair_io.tokenize_pair("The Louvre is in", "The Prado is in", " Big Ben", " Madrid", tok, multi_token="refuse")
    with pytest.raises(ValueError, match=r"wrong ' Big Ben' tokenises into 2 tokens"):
        pair_io.tokenize_pair("The Louvre is in", "The Prado is in", " Paris", " Big Ben", tok, multi_token="refuse")


def test_multi_token_answers_compare_the_first_tokens_that_differ(tok):
    """' Big Ben' vs ' Big Mosque'... : the shared ' Big' is appended to both prompts and the metric
    compares ' Ben' with the wrong answer's next token; answers that differ at once use their first."""
    pair = pair_io.tokenize_pair("The Louvre is in", "The Prado is in", " Big Ben", " Big Tower", tok)
    assert tok.decode(pair.clean_ids) == "The Louvre is in Big"
    assert tok.decode(pair.corrupt_ids) == "The Prado is in Big"
    assert tok.convert_ids_to_tokens([pair.answer_id, pair.wrong_id]) == [" Ben", " Tower"]
    first = pair_io.tokenize_pair("The Louvre is in", "The Prado is in", " Big Ben", " Madrid", tok)
    assert tok.convert_ids_to_tokens([first.answer_id, first.wrong_id]) == [" Big", " Madrid"]
    assert tok.decode(first.clean_ids) == "The Louvre is in"
    with pytest.raises(ValueError, match="one is a prefix of the other"):
        pair_io.tokenize_pair("The Louvre is in", "The Prado is in", " Big", " Big Ben", tok)


def test_unequal_lengths_error_shows_both_tokenisations(tok):
    pattern = (r"same token length, got 4 vs 5:\n"
               r"  clean   'The Louvre is in' -> \['The', ' Louvre', ' is', ' in'\]\n"
               r"  corrupt 'The Eiffel Tower is in' -> \['The', ' Eiffel', ' Tower', ' is'")
    with pytest.raises(ValueError, match=pattern):
        pair_io.tokenize_pair("The Louvre is in", "The Eiffel Tower is in", " Paris", " Rome", tok)


# ---------------------------------------------------------------------------- JSONL

def test_jsonl_round_trip_id_form(tmp_path, tok):
    pairs = tasks.builtin_task("facts", tokenizer=tok, n_pairs=5) + tasks.induction_pairs(range(30), 3)
    path = tmp_path / "pairs.jsonl"
    pair_io.save_jsonl(pairs, path)
    assert pair_io.load_jsonl(path) == pairs
    path.write_text('\n{"clean_ids": [1, 2], "corrupt_ids": [1, 3], "answer_id": 4, "wrong_id": 5}\n\n')
    assert pair_io.load_jsonl(path) == [PromptPair((1, 2), (1, 3), 4, 5)]


def test_jsonl_text_form(tmp_path, tok):
    texts = tasks.ioi_texts(4, seed=9)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(dict(zip(("clean", "corrupt", "answer", "wrong"), t))) + "\n"
                            for t in texts))
    assert pair_io.load_jsonl(path, tokenizer=tok) == [pair_io.tokenize_pair(*t, tok) for t in texts]
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: a text-form pair needs a tokenizer"):
        pair_io.load_jsonl(path)


GOOD = '{"clean": "The Louvre is in", "corrupt": "The Prado is in", "answer": " Paris", "wrong": " Madrid"}'


@pytest.mark.parametrize("line, match", [
    ('{"clean": "The Louvre is in", ', r"bad\.jsonl:3: invalid JSON"),
    ('{"clean": "The Louvre is in", "corrupt": "The Prado is in", "wrong": " Madrid"}',
     r"bad\.jsonl:3: missing field 'answer'"),
    ('{"clean": "The Louvre is in", "corrupt": "The Prado is in", "answer": 7, "wrong": " Madrid"}',
     r"bad\.jsonl:3: field 'answer' must be a string"),
    ('{"clean_ids": [1, 2], "corrupt_ids": [1, 3], "answer_id": "x", "wrong_id": 5}',
     r"bad\.jsonl:3: field 'answer_id' must be a non-negative int"),
    ('{"clean_ids": [1, 2], "corrupt_ids": [1, "a"], "answer_id": 4, "wrong_id": 5}',
     r"bad\.jsonl:3: field 'corrupt_ids' must be a list"),
    ('{"clean_ids": [1, 2], "corrupt_ids": [1], "answer_id": 4, "wrong_id": 5}',
     r"bad\.jsonl:3: clean and corrupt prompts must have the same token length, got 2 vs 1"),
    ('{"clean": "The Louvre is in", "corrupt": "The Big Ben is in", "answer": " Paris", "wrong": " London"}',
     r"bad\.jsonl:3: clean and corrupt .* got 4 vs 5"),
    ('{"clean": "The Louvre is in", "corrupt": "The Prado is in", "answer": " Big", "wrong": " Big Ben"}',
     r"bad\.jsonl:3: answer tokens .* one is a prefix of the other"),
    ('{"clean_ids": [1, 2], "corrupt_ids": [1, 3], "answer_id": 4, "wrong_id": 5, "roles": {"S2": 7}}',
     r"bad\.jsonl:3: roles \{'S2': 7\} are not token positions of the 2-token prompt"),
    ('["The Louvre is in"]', r"bad\.jsonl:3: expected a JSON object"),
    ('{"prompt": "The Louvre is in"}', r"bad\.jsonl:3: missing field 'clean' .* or 'clean_ids'"),
])
def test_malformed_line_names_path_line_and_field(tmp_path, tok, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")
    with pytest.raises(ValueError, match=match):
        pair_io.load_jsonl(path, tokenizer=tok)


def test_empty_file_has_no_pairs(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.jsonl: the file has no pairs"):
        pair_io.load_jsonl(path)


# ---------------------------------------------------------------------------- the shipped toy model

def test_toy_folder_is_small_and_self_describing(tok, model):
    size = sum(f.stat().st_size for f in TOY_MODEL_DIR.iterdir())
    assert size < 20 * 2**20
    assert (TOY_MODEL_DIR / "model.safetensors").exists()
    record = json.loads((TOY_MODEL_DIR / "training.json").read_text())
    assert record["command"].startswith("python scripts/train_toy_model.py")
    cfg = model.config
    assert cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert tok.convert_ids_to_tokens(tok(" Mary,", add_special_tokens=False)["input_ids"]) == [" Mary", ","]
    text = "When Mary and John went to the store, John gave a drink to"
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize("name", tasks.TASKS)
def test_toy_model_solves_held_out_prompts(name, tok, model):
    pairs = tasks.builtin_task(name, tokenizer=tok, n_pairs=64, seed=123, split="test")
    for prompts, right in (([p.clean_ids for p in pairs], [p.answer_id for p in pairs]),
                           ([p.corrupt_ids for p in pairs], [p.wrong_id for p in pairs])):
        correct = 0
        for length in sorted({len(p) for p in prompts}):  # batch prompts of equal length
            rows = [i for i, p in enumerate(prompts) if len(p) == length]
            with torch.no_grad():
                logits = model(torch.tensor([prompts[i] for i in rows])).logits[:, -1]
            correct += (logits.argmax(-1) == torch.tensor([right[i] for i in rows])).sum().item()
        assert correct / len(prompts) >= 0.95, (name, correct)
