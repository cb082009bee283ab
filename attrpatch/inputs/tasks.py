"""Built-in tasks (:data:`TASKS`), all built by symmetric token replacement (the corrupt prompt swaps key
tokens for similar ones, keeping the length); :func:`builtin_task` gives their prompt pairs.

  ``ioi``        "When Mary and John went to the store, John gave a drink to" -> " Mary";
                 corrupt (``str``, the S2 swap) repeats the other name ("..., Mary gave a drink to" -> " John");
                 ``abc`` corrupts S2 to a third name ("..., Paul gave a drink to": IO, S1, S2 all distinct).
  ``facts``      "The Colosseum is in" -> " Rome"; corrupt (``str``, the subject swap) uses another subject
                 of the same length with another answer ("The Louvre is in" -> " Paris").
  ``induction``  random tokens R, then R[:k]; answer R[k]. Corrupt changes R[k] in the first
                 occurrence to w, so its answer is w.

Every generator is deterministic given ``seed`` and has two disjoint splits, ``"train"`` and
``"test"``: IOI splits the (template, name, name) combinations, facts split the (template,
subject) combinations (the facts themselves are shared: they are memorised), induction uses
disjoint random streams.
"""

import random
import re
import string
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .pairs import PromptPair, tokenize_pair

TASKS = ("ioi", "facts", "induction")
SPLITS = ("train", "test")

# A text pair: (clean, corrupt, answer, wrong).
TextPair = tuple[str, str, str, str]


class TaskText(NamedTuple):
    """One generated pair as text, with its template's index and the character spans of its roles in
    the clean text ({role: (start, end)}); ``text`` is the plain (clean, corrupt, answer, wrong).
    ``thirds``: IOI only, the ABC corrupt texts (S2 replaced by a third name), one per candidate name in a
    fixed random order; tokenisation keeps the first whose name is one token in S2's place."""

    clean: str
    corrupt: str
    answer: str
    wrong: str
    template: int
    spans: dict
    thirds: tuple[str, ...] = ()

    @property
    def text(self) -> TextPair:
        return self.clean, self.corrupt, self.answer, self.wrong


def _fill(template: str, values: dict) -> tuple[str, dict[str, tuple[int, int]]]:
    """template.format(**values), and the character span of each field in the result."""
    out, spans = "", {}
    for literal, name, _, _ in string.Formatter().parse(template):
        out += literal
        if name is not None:
            spans.setdefault(name, (len(out), len(out) + len(values[name])))
            out += values[name]
    return out, spans

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


def _ioi_stream(seed: int, split: str) -> Iterator[TaskText]:
    """Roles: IO (the clean answer's first mention), S1 (the subject's first mention), S2 (the repeated
    subject, the corrupted token), END (added on tokenization)."""
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
        clean, spans = _fill(IOI_TEMPLATES[t], {"S": s, **fill})
        corrupt = IOI_TEMPLATES[t].format(S=io, **fill)
        first_io, first_s = ("A", "B") if io == n1 else ("B", "A")
        # the third names come from their own generator, so the clean prompts are the same under str and abc
        thirds = [n for n in IOI_NAMES if n not in (n1, n2)]
        random.Random(f"ioi-abc|{split}|{seed}|{clean}").shuffle(thirds)
        yield TaskText(clean, corrupt, " " + io, " " + s, t,
                       {"IO": spans[first_io], "S1": spans[first_s], "S2": spans["S"]},
                       tuple(IOI_TEMPLATES[t].format(S=c, **fill) for c in thirds))


def ioi_texts(n: int, seed: int = 0, split: str = "test", corruption: str = "str") -> list[TextPair]:
    """n IOI text pairs (clean, corrupt, answer, wrong); corrupt repeats the other name (``str``) or, for
    ``abc``, puts the first candidate third name in S2's place."""
    stream = _ioi_stream(seed, split)
    texts = [next(stream) for _ in range(n)]
    return [t.text if corruption == "str" else (t.clean, t.thirds[0], t.answer, t.wrong) for t in texts]


def _facts_stream(seed: int, split: str) -> Iterator[TaskText]:
    """Roles: subject (its last token, where factual recall is read: Meng et al.), END."""
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
        clean, spans = _fill(FACT_TEMPLATES[t], {"s": subject})
        yield TaskText(clean, FACT_TEMPLATES[t].format(s=other), " " + answer, " " + wrong, t,
                       {"subject": spans["s"]})


def facts_texts(n: int, seed: int = 0, split: str = "test") -> list[TextPair]:
    """n factual-recall text pairs; corrupt uses a subject with as many words, another city."""
    stream = _facts_stream(seed, split)
    return [next(stream).text for _ in range(n)]


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
        pairs.append(PromptPair(tuple(r + r[:k]), tuple(corrupt_r + r[:k]), r[k], w, template="induction",
                                roles={"copied": k, "END": seq_len + k - 1}))
    return pairs


def word_token_ids(tokenizer) -> list[int]:
    """Ids of ordinary word tokens: a space then two or more ASCII letters (' apple')."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    return [i for i, text in zip(ids, texts) if re.fullmatch(r" [A-Za-z]{2,}", text)]


# ---------------------------------------------------------------------------- built-in tasks

TEMPLATES = {"ioi": IOI_TEMPLATES, "facts": FACT_TEMPLATES, "induction": ("induction",)}


@dataclass
class TaskDraw:
    """The pairs drawn from a built-in task, and what was skipped on the way: {reason: count}."""

    pairs: list[PromptPair]
    skipped: Counter = field(default_factory=Counter)

    def skipped_words(self, most: int = 5) -> str:
        """'3 of 23 candidates skipped: answer ' Agra' splits into 2 tokens (2), ...' or ''."""
        if not self.skipped:
            return ""
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{r} ({n})" for r, n in self.skipped.most_common(most))
        return f"{total} of {total + len(self.pairs)} candidate pairs skipped: {reasons}"


def _skip_reason(err: ValueError, texts: TaskText) -> str:
    message = str(err)
    for name, text in (("answer", texts.answer), ("wrong", texts.wrong)):
        if message.startswith(f"{name} "):
            return f"{text!r} splits into several tokens"
    if message.startswith(NO_THIRD):
        return NO_THIRD
    return "clean and corrupt token lengths differ"


NO_THIRD = "no third name is one token in S2's place"


def _pair(texts: TaskText, tokenizer, bos: int | None, template: str, corruption: str) -> PromptPair:
    """One tokenised pair; for ``abc``, with the first third name that changes S2's token and no other."""
    options = dict(bos=bos, spans=texts.spans, template=template, multi_token="refuse")
    if corruption != "abc":
        return tokenize_pair(*texts.text, tokenizer, **options)
    for corrupt in texts.thirds:
        try:
            pair = tokenize_pair(texts.clean, corrupt, texts.answer, texts.wrong, tokenizer, **options)
        except ValueError as err:
            if str(err).startswith(("answer ", "wrong ")):
                raise
            continue
        changed = [i for i, (a, b) in enumerate(zip(pair.clean_ids, pair.corrupt_ids)) if a != b]
        if changed == [pair.role_positions["S2"]]:
            return pair
    raise ValueError(f"{NO_THIRD} of {texts.clean!r}")


def _tokenized(stream: Iterator[TaskText], tokenizer, n_pairs: int, name: str, bos: int | None,
               template: int | None, corruption: str = "str") -> TaskDraw:
    """The first n_pairs of ``stream`` (of ``template`` only, if given) that tokenise validly; the others
    are skipped and counted by reason. corruption: ``abc`` takes IOI's third-name corrupt prompts."""
    draw, tries, max_tries = TaskDraw([]), 0, max(2000, 50 * n_pairs)
    last_error = None
    while len(draw.pairs) < n_pairs and tries < max_tries:
        texts = next(stream)
        if template is not None and texts.template != template:
            continue
        tries += 1
        try:
            draw.pairs.append(_pair(texts, tokenizer, bos, TEMPLATES[name][texts.template], corruption))
        except ValueError as err:
            last_error = err
            draw.skipped[_skip_reason(err, texts)] += 1
    if not draw.pairs:
        raise ValueError(f"task {name!r}: none of {tries} candidate pairs tokenises into equal "
                         f"lengths with single-token answers; last error: {last_error}")
    if len(draw.pairs) < n_pairs:
        warnings.warn(f"task {name!r}: only {len(draw.pairs)} of {n_pairs} pairs tokenise validly",
                      stacklevel=3)
    return draw


def check_template(name: str, template: int | None) -> None:
    if template is not None and not 0 <= template < len(TEMPLATES.get(name, ())):
        known = "\n".join(f"  {i}: {t}" for i, t in enumerate(TEMPLATES.get(name, ())))
        raise ValueError(f"template {template} out of range for task {name!r}; its templates are:\n{known}")


def draw_task(name: str, tokenizer=None, n_pairs: int = 64, seed: int = 0, vocab_size: int | None = None,
              split: str = "test", *, bos: int | None = None, template: int | None = None,
              corruption: str = "str") -> TaskDraw:
    """Pairs of a built-in task (see :data:`TASKS`), deterministic given seed and split, each with its
    template and roles; ``bos`` (a token id) is put first in every prompt; ``template`` (an index into
    the task's templates, :data:`TEMPLATES`) keeps one template only. ``corruption``: the corrupt prompts,
    ``str`` (the task's own) or, for IOI, ``abc`` (a third name at S2; same clean prompts, except that a
    pair with no one-token third name is skipped).

    Text tasks need a tokenizer; pairs whose tokenisation is unequal in length or has a multi-token
    answer are skipped and counted. ``induction`` draws from the tokenizer's word tokens, or from
    ``range(vocab_size)`` without a tokenizer.
    """
    _check_split(split)
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; known: {', '.join(TASKS)}")
    check_template(name, template)
    if corruption not in ("str", "abc") or (corruption == "abc" and name != "ioi"):
        raise ValueError(f"task {name!r} has no corrupt prompts {corruption!r}; it draws: str"
                         + (", abc" if name == "ioi" else "") + " (noise is added to the str pairs' batch)")
    if name == "induction":
        return TaskDraw(_induction(tokenizer, n_pairs, seed, vocab_size, split, bos))
    if tokenizer is None:
        raise ValueError(f"task {name!r} is a text task and needs a tokenizer")
    streams = {"ioi": _ioi_stream, "facts": _facts_stream}
    return _tokenized(streams[name](seed, split), tokenizer, n_pairs, name, bos, template, corruption)


def _induction(tokenizer, n_pairs: int, seed: int, vocab_size: int | None, split: str, bos: int | None):
    if tokenizer is not None:
        vocab_ids = word_token_ids(tokenizer)
    elif vocab_size is not None:
        vocab_ids = range(vocab_size)
    else:
        raise ValueError("task 'induction' needs a tokenizer or vocab_size")
    pairs = induction_pairs(vocab_ids, n_pairs, seed=seed, split=split)
    lead = () if bos is None else (bos,)
    decode = (lambda ids: tokenizer.decode(list(ids))) if tokenizer is not None else (lambda ids: None)
    return [PromptPair(lead + p.clean_ids, lead + p.corrupt_ids, p.answer_id, p.wrong_id,
                       clean=decode(p.clean_ids), corrupt=decode(p.corrupt_ids), answer=decode([p.answer_id]),
                       wrong=decode([p.wrong_id]), template=p.template,
                       roles={r: q + len(lead) for r, q in p.role_positions.items()}) for p in pairs]


def builtin_task(name: str, tokenizer=None, n_pairs: int = 64, seed: int = 0,
                 vocab_size: int | None = None, split: str = "test", *, bos: int | None = None,
                 template: int | None = None, corruption: str = "str") -> list[PromptPair]:
    """The pairs of :func:`draw_task`."""
    return draw_task(name, tokenizer, n_pairs, seed, vocab_size, split, bos=bos, template=template,
                     corruption=corruption).pairs
