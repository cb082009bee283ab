"""Prompt pairs: a clean and a corrupt prompt of the same token length, with their answers.

A :class:`PromptPair` holds token ids (and the text, when known). Pairs come from three places:

- :func:`tokenize_pair` for one pair of texts;
- :func:`load_jsonl` for a file of pairs, in text form or id form;
- :func:`builtin_task` for the built-in tasks in :data:`TASKS`, all built by symmetric token
  replacement (the corrupt prompt swaps key tokens for similar ones, keeping the length):

  ``ioi``        "When Mary and John went to the store, John gave a drink to" -> " Mary";
                 corrupt repeats the other name ("..., Mary gave a drink to" -> " John").
  ``facts``      "The Colosseum is in" -> " Rome"; corrupt uses another subject of the same
                 length with another answer ("The Louvre is in" -> " Paris").
  ``induction``  random tokens R, then R[:k]; answer R[k]. Corrupt changes R[k] in the first
                 occurrence to w, so its answer is w.

Every generator is deterministic given ``seed`` and has two disjoint splits, ``"train"`` and
``"test"``: IOI splits the (template, name, name) combinations, facts split the (template,
subject) combinations (the facts themselves are shared: they are memorised), induction uses
disjoint random streams.
"""

import json
import random
import re
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

TASKS = ("ioi", "facts", "induction")
# The shipped toy GPT-2 and its tokenizer, trained on these tasks (scripts/train_toy_model.py).
TOY_MODEL_DIR = Path(__file__).resolve().parent / "data" / "toy-gpt2"
SPLITS = ("train", "test")

# A text pair: (clean, corrupt, answer, wrong).
TextPair = tuple[str, str, str, str]

IOI_NAMES = (
    "Mary", "John", "Tom", "James", "Dan", "Sarah", "Paul", "Anna", "Mark", "Kate", "Peter",
    "Lisa", "David", "Emma", "Michael", "Laura", "Chris", "Alice", "Robert", "Jane", "Steve",
    "Rachel", "Ben", "Amy",
)
IOI_PLACES = (
    "store", "park", "school", "hospital", "restaurant", "office", "station", "beach",
    "library", "market", "garden", "museum", "church", "bank",
)
IOI_OBJECTS = (
    "drink", "book", "ball", "gift", "letter", "key", "bag", "cup", "pen", "flower", "ring",
    "snack",
)
# {A} and {B} introduce the two names; {S} repeats one of them; the answer is the other one.
IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
    "Then, {A} and {B} went to the {place}. {S} gave a {object} to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} handed a {object} to",
    "Friends {A} and {B} found a {object} at the {place}. {S} gave it to",
    "{A} and {B} had a long day at the {place}. {S} gave a {object} to",
    "The {place} was busy when {A} and {B} arrived. {S} passed a {object} to",
)

# (subject, city): real landmarks. Every answer is a single word.
FACTS = (
    ("Colosseum", "Rome"), ("Pantheon", "Rome"), ("Louvre", "Paris"), ("Kremlin", "Moscow"),
    ("Acropolis", "Athens"), ("Parthenon", "Athens"), ("Prado", "Madrid"),
    ("Reichstag", "Berlin"), ("Uffizi", "Florence"), ("Rijksmuseum", "Amsterdam"),
    ("Atomium", "Brussels"), ("Alhambra", "Granada"),
    ("Eiffel Tower", "Paris"), ("Notre Dame", "Paris"), ("Big Ben", "London"),
    ("Tower Bridge", "London"), ("Buckingham Palace", "London"), ("Westminster Abbey", "London"),
    ("Red Square", "Moscow"), ("Trevi Fountain", "Rome"), ("Brandenburg Gate", "Berlin"),
    ("Checkpoint Charlie", "Berlin"), ("Sagrada Familia", "Barcelona"),
    ("Forbidden City", "Beijing"), ("Harbour Bridge", "Sydney"), ("Hagia Sophia", "Istanbul"),
    ("Blue Mosque", "Istanbul"), ("Charles Bridge", "Prague"), ("Rialto Bridge", "Venice"),
    ("Space Needle", "Seattle"), ("Burj Khalifa", "Dubai"), ("Little Mermaid", "Copenhagen"),
    ("Tivoli Gardens", "Copenhagen"), ("Sugarloaf Mountain", "Rio"), ("Leaning Tower", "Pisa"),
    ("Wawel Castle", "Krakow"), ("Meiji Shrine", "Tokyo"), ("Schonbrunn Palace", "Vienna"),
    ("Taj Mahal", "Agra"), ("Arc de Triomphe", "Paris"), ("Christ the Redeemer", "Rio"),
    ("Gateway of India", "Mumbai"), ("Palace of Westminster", "London"),
)
FACT_TEMPLATES = (
    "The {s} is in",
    "The {s} is located in",
    "The {s} can be found in",
    "Tourists visit the {s} in",
    "The famous {s} is in",
    "You can see the {s} in",
    "The {s} stands in",
    "Every year people travel to see the {s} in",
)


@dataclass(frozen=True)
class PromptPair:
    """A clean and a corrupt prompt of the same token length.

    ``answer_id`` is the right next token for the clean prompt, ``wrong_id`` the right one for
    the corrupt prompt. The text fields are for display and are ``None`` when unknown.
    Lists are accepted for the id fields and stored as tuples.
    """

    clean_ids: tuple[int, ...]
    corrupt_ids: tuple[int, ...]
    answer_id: int
    wrong_id: int
    clean: str | None = None
    corrupt: str | None = None
    answer: str | None = None
    wrong: str | None = None

    def __post_init__(self):
        for name in ("clean_ids", "corrupt_ids"):
            ids = getattr(self, name)
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
                raise TypeError(f"{name} must be a sequence of token ids, got {type(ids).__name__}")
            if not all(_is_id(i) for i in ids):
                raise TypeError(f"{name} must hold non-negative ints, got {list(ids)!r}")
            if len(ids) == 0:
                raise ValueError(f"{name} is empty; a prompt needs at least one token")
            object.__setattr__(self, name, tuple(int(i) for i in ids))
        for name in ("answer_id", "wrong_id"):
            if not _is_id(getattr(self, name)):
                raise TypeError(f"{name} must be a non-negative int, got {getattr(self, name)!r}")
        for name in ("clean", "corrupt", "answer", "wrong"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
        if len(self.clean_ids) != len(self.corrupt_ids):
            clean = f" ({self.clean!r})" if self.clean is not None else ""
            corrupt = f" ({self.corrupt!r})" if self.corrupt is not None else ""
            raise ValueError(
                f"clean and corrupt prompts must have the same token length, got "
                f"{len(self.clean_ids)} vs {len(self.corrupt_ids)}: clean{clean} = "
                f"{list(self.clean_ids)}, corrupt{corrupt} = {list(self.corrupt_ids)}"
            )

    def to_dict(self) -> dict:
        """JSON-ready dict in id form, with the text fields that are known."""
        data = asdict(self)
        data["clean_ids"], data["corrupt_ids"] = list(self.clean_ids), list(self.corrupt_ids)
        return {k: v for k, v in data.items() if v is not None}


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _encode(text: str, tokenizer) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_pair(clean: str, corrupt: str, answer: str, wrong: str, tokenizer) -> PromptPair:
    """Tokenise a text pair (no special tokens). Raises ValueError, showing the tokens, when an
    answer is not exactly one token or when clean and corrupt differ in token length."""
    ids = {}
    for name, text in (("answer", answer), ("wrong", wrong)):
        ids[name] = _encode(text, tokenizer)
        if len(ids[name]) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids[name])
            raise ValueError(
                f"{name} {text!r} tokenises into {len(ids[name])} tokens {pieces!r}; "
                f"use a single-token {name} (often with a leading space, e.g. ' Paris')"
            )
    clean_ids, corrupt_ids = _encode(clean, tokenizer), _encode(corrupt, tokenizer)
    if len(clean_ids) != len(corrupt_ids):
        raise ValueError(
            f"clean and corrupt prompts must have the same token length, got "
            f"{len(clean_ids)} vs {len(corrupt_ids)}:\n"
            f"  clean   {clean!r} -> {tokenizer.convert_ids_to_tokens(clean_ids)!r}\n"
            f"  corrupt {corrupt!r} -> {tokenizer.convert_ids_to_tokens(corrupt_ids)!r}\n"
            "swap in words of the same token length"
        )
    return PromptPair(clean_ids, corrupt_ids, ids["answer"][0], ids["wrong"][0],
                      clean=clean, corrupt=corrupt, answer=answer, wrong=wrong)


# ---------------------------------------------------------------------------- JSONL files

_TEXT_FIELDS = ("clean", "corrupt", "answer", "wrong")
_ID_FIELDS = ("clean_ids", "corrupt_ids", "answer_id", "wrong_id")


def _pair_from_json(obj, tokenizer) -> PromptPair:
    """One parsed JSON line -> PromptPair. Errors name the field; the caller adds path:lineno."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "clean_ids" not in obj and "clean" not in obj:
        raise ValueError("missing field 'clean' (text form) or 'clean_ids' (id form)")
    id_form = "clean_ids" in obj
    for name in _ID_FIELDS if id_form else _TEXT_FIELDS:
        if name not in obj:
            raise ValueError(f"missing field {name!r}")
    for name in _TEXT_FIELDS:
        if name in obj and not isinstance(obj[name], str):
            raise ValueError(f"field {name!r} must be a string, got {obj[name]!r}")
    if not id_form:
        if tokenizer is None:
            raise ValueError("a text-form pair needs a tokenizer; pass tokenizer= or write the "
                             "id form (clean_ids, corrupt_ids, answer_id, wrong_id)")
        return tokenize_pair(*(obj[name] for name in _TEXT_FIELDS), tokenizer)
    for name in ("clean_ids", "corrupt_ids"):
        if not isinstance(obj[name], list) or not all(_is_id(i) for i in obj[name]):
            raise ValueError(f"field {name!r} must be a list of non-negative ints, got {obj[name]!r}")
    for name in ("answer_id", "wrong_id"):
        if not _is_id(obj[name]):
            raise ValueError(f"field {name!r} must be a non-negative int, got {obj[name]!r}")
    return PromptPair(*(obj[name] for name in _ID_FIELDS), **{k: obj.get(k) for k in _TEXT_FIELDS})


def load_jsonl(path: str | Path, tokenizer=None) -> list[PromptPair]:
    """Read pairs from a JSON-lines file, one object per line (blank lines skipped).

    Text form: ``{"clean": ..., "corrupt": ..., "answer": " Mary", "wrong": " John"}`` (needs
    ``tokenizer``). Id form: ``{"clean_ids": [...], "corrupt_ids": [...], "answer_id": 1,
    "wrong_id": 2}`` (text fields optional). A bad line raises ValueError ``path:lineno: ...``.
    """
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
            try:
                pairs.append(_pair_from_json(obj, tokenizer))
            except (ValueError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: {err}") from None
    if not pairs:
        raise ValueError(f"{path}: the file has no pairs (expected one JSON object per line)")
    return pairs


def save_jsonl(pairs: Sequence[PromptPair], path: str | Path) -> None:
    """Write pairs in id form (with known text fields); :func:`load_jsonl` reads them back."""
    with open(path, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_dict()) + "\n")


# ---------------------------------------------------------------------------- generators

def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; known: {', '.join(SPLITS)}")


def _in_split(key: str, split: str, test_every: int) -> bool:
    """Stable hash split: about 1/test_every of the keys are 'test', the rest 'train'."""
    return (zlib.crc32(key.encode()) % test_every == 0) == (split == "test")


def _ioi_stream(seed: int, split: str) -> Iterator[TextPair]:
    _check_split(split)
    rng = random.Random(f"ioi|{split}|{seed}")
    while True:
        t = rng.randrange(len(IOI_TEMPLATES))
        n1, n2 = rng.sample(IOI_NAMES, 2)
        if not _in_split(f"{t}|{n1}|{n2}", split, test_every=5):
            continue
        place, obj = rng.choice(IOI_PLACES), rng.choice(IOI_OBJECTS)
        io, s = (n1, n2) if rng.random() < 0.5 else (n2, n1)  # io: the clean answer
        fill = dict(A=n1, B=n2, place=place, object=obj)
        clean = IOI_TEMPLATES[t].format(S=s, **fill)
        corrupt = IOI_TEMPLATES[t].format(S=io, **fill)
        yield clean, corrupt, " " + io, " " + s


def ioi_texts(n: int, seed: int = 0, split: str = "test") -> list[TextPair]:
    """n IOI text pairs (clean, corrupt, answer, wrong); corrupt repeats the other name."""
    stream = _ioi_stream(seed, split)
    return [next(stream) for _ in range(n)]


def _facts_stream(seed: int, split: str) -> Iterator[TextPair]:
    _check_split(split)
    rng = random.Random(f"facts|{split}|{seed}")
    by_template = [[(s, a) for s, a in FACTS if _in_split(f"{t}|{s}", split, test_every=4)]
                   for t in range(len(FACT_TEMPLATES))]
    while True:
        t = rng.randrange(len(FACT_TEMPLATES))
        subject, answer = rng.choice(by_template[t])
        others = [(s, a) for s, a in by_template[t]
                  if a != answer and len(s.split()) == len(subject.split())]
        if not others:
            continue
        other, wrong = rng.choice(others)
        yield (FACT_TEMPLATES[t].format(s=subject), FACT_TEMPLATES[t].format(s=other),
               " " + answer, " " + wrong)


def facts_texts(n: int, seed: int = 0, split: str = "test") -> list[TextPair]:
    """n factual-recall text pairs; corrupt uses a subject with as many words, another city."""
    stream = _facts_stream(seed, split)
    return [next(stream) for _ in range(n)]


def induction_pairs(vocab_ids: Sequence[int], n_pairs: int, seq_len: int = 10, seed: int = 0,
                    *, prefix_len: int | None = None, split: str = "test") -> list[PromptPair]:
    """Repeated random tokens: R (seq_len distinct ids) then R[:k], k = prefix_len
    (default seq_len // 2). Clean answer R[k]; corrupt replaces R[k] in the first copy with an
    id w not in R, so the prompts differ at position k only and the corrupt answer is w."""
    _check_split(split)
    k = seq_len // 2 if prefix_len is None else prefix_len
    ids = sorted(set(int(i) for i in vocab_ids))
    if seq_len < 2 or not 1 <= k < seq_len:
        raise ValueError(f"need seq_len >= 2 and 1 <= prefix_len < seq_len, got {seq_len}, {k}")
    if len(ids) < seq_len + 1:
        raise ValueError(f"induction needs at least seq_len + 1 = {seq_len + 1} distinct "
                         f"vocab_ids, got {len(ids)}")
    rng = random.Random(f"induction|{split}|{seed}")
    pairs = []
    for _ in range(n_pairs):
        *r, w = rng.sample(ids, seq_len + 1)
        corrupt_r = r[:k] + [w] + r[k + 1:]
        pairs.append(PromptPair(tuple(r + r[:k]), tuple(corrupt_r + r[:k]), r[k], w))
    return pairs


def word_token_ids(tokenizer) -> list[int]:
    """Ids of ordinary word tokens: a space then two or more ASCII letters (' apple')."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    return [i for i, text in zip(ids, texts) if re.fullmatch(r" [A-Za-z]{2,}", text)]


# ---------------------------------------------------------------------------- built-in tasks

def _tokenized(stream: Iterator[TextPair], tokenizer, n_pairs: int, name: str) -> list[PromptPair]:
    """First n_pairs of stream that tokenise validly; the others are skipped."""
    pairs, tries, max_tries = [], 0, max(2000, 50 * n_pairs)
    last_error = None
    while len(pairs) < n_pairs and tries < max_tries:
        tries += 1
        try:
            pairs.append(tokenize_pair(*next(stream), tokenizer))
        except ValueError as err:
            last_error = err
    if not pairs:
        raise ValueError(f"task {name!r}: none of {tries} candidate pairs tokenises into equal "
                         f"lengths with single-token answers; last error: {last_error}")
    if len(pairs) < n_pairs:
        warnings.warn(f"task {name!r}: only {len(pairs)} of {n_pairs} pairs tokenise validly",
                      stacklevel=3)
    return pairs


def builtin_task(name: str, tokenizer=None, n_pairs: int = 64, seed: int = 0,
                 vocab_size: int | None = None, split: str = "test") -> list[PromptPair]:
    """Pairs of a built-in task (see :data:`TASKS`), deterministic given seed and split.

    Text tasks need a tokenizer; pairs whose tokenisation is unequal in length or has a
    multi-token answer are skipped. ``induction`` draws from the tokenizer's word tokens, or
    from ``range(vocab_size)`` without a tokenizer.
    """
    _check_split(split)
    if name == "induction":
        if tokenizer is not None:
            vocab_ids = word_token_ids(tokenizer)
        elif vocab_size is not None:
            vocab_ids = range(vocab_size)
        else:
            raise ValueError("task 'induction' needs a tokenizer or vocab_size")
        pairs = induction_pairs(vocab_ids, n_pairs, seed=seed, split=split)
        if tokenizer is None:
            return pairs
        return [PromptPair(p.clean_ids, p.corrupt_ids, p.answer_id, p.wrong_id,
                           clean=tokenizer.decode(p.clean_ids),
                           corrupt=tokenizer.decode(p.corrupt_ids),
                           answer=tokenizer.decode([p.answer_id]),
                           wrong=tokenizer.decode([p.wrong_id])) for p in pairs]
    streams = {"ioi": _ioi_stream, "facts": _facts_stream}
    if name not in streams:
        raise ValueError(f"Unknown task {name!r}; known: {', '.join(TASKS)}")
    if tokenizer is None:
        raise ValueError(f"task {name!r} is a text task and needs a tokenizer")
    return _tokenized(streams[name](seed, split), tokenizer, n_pairs, name)
