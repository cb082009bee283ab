"""Built-in tasks (:data:`TASKS`), all built by symmetric token replacement (the corrupt prompt swaps key
tokens for similar ones, keeping the length); :func:`builtin_task` gives their prompt pairs.

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

import random
import re
import warnings
import zlib
from collections.abc import Iterator, Sequence

from .pairs import PromptPair, tokenize_pair

TASKS = ("ioi", "facts", "induction")
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
