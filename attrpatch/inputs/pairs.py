"""Prompt pairs: a clean and a corrupt prompt of the same token length, with their answers.

A :class:`PromptPair` holds token ids (and the text, when known), optionally the template it came from
and named roles (token positions of S1, IO, S2, END, subject, ...). :func:`tokenize_pair` makes one from
texts (tokenization.py: BOS, roles, answers of several tokens); :func:`load_jsonl` reads a file of pairs
in text form or id form; :func:`save_jsonl` writes one.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .tokenization import encode, first_difference, role_positions


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
    template: str | None = None  # the built-in template (or any group label) the pair came from
    roles: tuple[tuple[str, int], ...] | None = None  # (role, token position) pairs; a dict is accepted

    @property
    def role_positions(self) -> dict[str, int]:
        return dict(self.roles or ())

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
        if self.roles is not None:
            roles = self.roles.items() if isinstance(self.roles, Mapping) else self.roles
            roles = tuple((str(r), p) for r, p in roles)
            bad = [(r, p) for r, p in roles if not _is_id(p) or p >= len(self.clean_ids)]
            if bad:
                raise ValueError(f"roles {dict(bad)} are not token positions of the {len(self.clean_ids)}-token "
                                 f"prompt (0..{len(self.clean_ids) - 1})")
            object.__setattr__(self, "roles", tuple(sorted(roles, key=lambda rp: (rp[1], rp[0]))))
        for name in ("clean", "corrupt", "answer", "wrong", "template"):
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
        data["roles"] = None if self.roles is None else self.role_positions
        return {k: v for k, v in data.items() if v is not None}


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tokenize_pair(clean: str, corrupt: str, answer: str, wrong: str, tokenizer, *, bos: int | None = None,
                  spans: dict[str, tuple[int, int]] | None = None, template: str | None = None,
                  multi_token: str = "first_difference") -> PromptPair:
    """Tokenise a text pair without special tokens, then put ``bos`` (a token id, or None) first.

    spans: {role: (start, end)} character spans of the clean text, turned into token positions (BOS
    counted), plus END, the last position. multi_token: ``first_difference`` (answers of several tokens
    follow tokenization.first_difference) or ``refuse`` (a ValueError naming the tokens). A ValueError
    also shows both tokenisations when clean and corrupt differ in token length."""
    ids = {name: encode(text, tokenizer) for name, text in (("answer", answer), ("wrong", wrong))}
    prefix = []
    for name, text in (("answer", answer), ("wrong", wrong)):
        if not ids[name]:
            raise ValueError(f"{name} {text!r} encodes to no token")
        if len(ids[name]) != 1 and multi_token == "refuse":
            pieces = tokenizer.convert_ids_to_tokens(ids[name])
            raise ValueError(
                f"{name} {text!r} tokenises into {len(ids[name])} tokens {pieces!r}; "
                f"use a single-token {name} (often with a leading space, e.g. ' Paris')")
    prefix, answer_id, wrong_id = first_difference(ids["answer"], ids["wrong"])
    clean_ids, corrupt_ids = encode(clean, tokenizer), encode(corrupt, tokenizer)
    if len(clean_ids) != len(corrupt_ids):
        raise ValueError(
            f"clean and corrupt prompts must have the same token length, got "
            f"{len(clean_ids)} vs {len(corrupt_ids)}:\n"
            f"  clean   {clean!r} -> {tokenizer.convert_ids_to_tokens(clean_ids)!r}\n"
            f"  corrupt {corrupt!r} -> {tokenizer.convert_ids_to_tokens(corrupt_ids)!r}\n"
            "swap in words of the same token length"
        )
    lead = [] if bos is None else [bos]
    clean_ids, corrupt_ids = lead + clean_ids + prefix, lead + corrupt_ids + prefix
    roles = None
    if spans is not None:
        found = role_positions(clean, tokenizer, spans)
        roles = None if found is None else {r: p + len(lead) for r, p in found.items()}
        if roles is not None:
            roles["END"] = len(clean_ids) - 1
    return PromptPair(clean_ids, corrupt_ids, answer_id, wrong_id, clean=clean, corrupt=corrupt, answer=answer,
                      wrong=wrong, template=template, roles=roles)


# ---------------------------------------------------------------------------- JSONL files

_TEXT_FIELDS = ("clean", "corrupt", "answer", "wrong")
_ID_FIELDS = ("clean_ids", "corrupt_ids", "answer_id", "wrong_id")


def _pair_from_json(obj, tokenizer, bos: int | None) -> PromptPair:
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
        pair = tokenize_pair(*(obj[name] for name in _TEXT_FIELDS), tokenizer, bos=bos, template=obj.get("template"))
        return pair if "roles" not in obj else _with_roles(pair, obj["roles"], shift=0 if bos is None else 1)
    for name in ("clean_ids", "corrupt_ids"):
        if not isinstance(obj[name], list) or not all(_is_id(i) for i in obj[name]):
            raise ValueError(f"field {name!r} must be a list of non-negative ints, got {obj[name]!r}")
    for name in ("answer_id", "wrong_id"):
        if not _is_id(obj[name]):
            raise ValueError(f"field {name!r} must be a non-negative int, got {obj[name]!r}")
    roles = obj.get("roles")
    if roles is not None and not isinstance(roles, dict):
        raise ValueError(f"field 'roles' must be an object {{role: token position}}, got {roles!r}")
    return PromptPair(*(obj[name] for name in _ID_FIELDS), **{k: obj.get(k) for k in (*_TEXT_FIELDS, "template")},
                      roles=roles)


def _with_roles(pair: PromptPair, roles, shift: int) -> PromptPair:
    """A text-form pair with the roles its JSON line names: token positions of the prompt as written,
    shifted past a prepended BOS."""
    if not isinstance(roles, dict):
        raise ValueError(f"field 'roles' must be an object {{role: token position}}, got {roles!r}")
    return PromptPair(pair.clean_ids, pair.corrupt_ids, pair.answer_id, pair.wrong_id, clean=pair.clean,
                      corrupt=pair.corrupt, answer=pair.answer, wrong=pair.wrong, template=pair.template,
                      roles={r: p + shift if isinstance(p, int) else p for r, p in roles.items()})


def _excerpt(line: str, pos: int, width: int = 60) -> str:
    """The part of ``line`` around character ``pos``, and a caret under that character."""
    start = max(0, min(pos - width // 2, len(line) - width))
    shown = line[start:start + width]
    lead = "  ..." if start else "  "
    return f"{lead}{shown}{'...' if start + width < len(line) else ''}\n{' ' * (len(lead) + pos - start)}^"


def load_jsonl(path: str | Path, tokenizer=None, *, bos: int | None = None) -> list[PromptPair]:
    """Read pairs from a JSON-lines file, one object per line (blank lines skipped).

    Text form: ``{"clean": ..., "corrupt": ..., "answer": " Mary", "wrong": " John"}`` (needs
    ``tokenizer``). Id form: ``{"clean_ids": [...], "corrupt_ids": [...], "answer_id": 1,
    "wrong_id": 2}`` (text fields optional; ids are used as written, BOS included if wanted). Either form
    may name ``"roles": {"S2": 10, ...}`` (token positions; in text form counted without the BOS, which
    ``bos`` prepends) and a ``"template"`` label. Answers of several tokens follow the first-difference
    rule (tokenization.first_difference). A bad line raises ValueError ``path:lineno: ...``.
    """
    pairs = []
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (some editors write one) is not JSON
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {err.msg} at column {err.colno} of the line:\n"
                                 f"{_excerpt(line.rstrip(chr(10)), err.pos)}") from None
            try:
                pairs.append(_pair_from_json(obj, tokenizer, bos))
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
