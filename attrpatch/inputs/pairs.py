"""Prompt pairs: a clean and a corrupt prompt of the same token length, with their answers.

A :class:`PromptPair` holds token ids (and the text, when known). :func:`tokenize_pair` makes one from
texts; :func:`load_jsonl` reads a file of pairs in text form or id form; :func:`save_jsonl` writes one.
"""

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


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
