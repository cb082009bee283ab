"""Positions that mean the same token in every prompt (docs/methods.md#prompts).

A per-position component averages over prompts, so position p must play one role in every prompt. A
pair's *layout* is its token length and, where the pair names its roles (S1, IO, S2, END, subject, ...),
the role positions; without roles, the positions where clean and corrupt differ (the corrupted tokens).
Pairs of one layout align; a per-position screen takes one layout:

    keep_one_layout(pairs)    built-in tasks: the most common layout (ties: the first drawn), the rest dropped
    check_one_layout(pairs)   user files: a ValueError naming two pairs that differ, and the fixes
    position_labels(pairs, tokenizer)   the axis: a role's name where one sits, else the token if every
                                        prompt has the same one there, else '*'
"""

from collections import Counter

from .pairs import PromptPair

VARIES = "*"  # the label of a position whose token differs between prompts and that names no role


def layout(pair: PromptPair) -> tuple:
    """(length, roles) when the pair names roles, else (length, corrupted positions)."""
    if pair.roles:
        return len(pair.clean_ids), pair.roles
    return len(pair.clean_ids), tuple(i for i, (a, b) in enumerate(zip(pair.clean_ids, pair.corrupt_ids)) if a != b)


def keep_one_layout(pairs: list[PromptPair]) -> tuple[list[PromptPair], int]:
    """The pairs of the most common layout, in drawn order, and how many others were dropped."""
    counts = Counter(layout(p) for p in pairs)
    best = max(counts, key=lambda key: (counts[key], -next(i for i, p in enumerate(pairs) if layout(p) == key)))
    kept = [p for p in pairs if layout(p) == best]
    return kept, len(pairs) - len(kept)


def _describe(i: int, pair: PromptPair) -> str:
    n, where = layout(pair)
    kind = "roles " + ", ".join(f"{r}@{q}" for r, q in where) if pair.roles else f"corrupted positions {list(where)}"
    text = f" {pair.clean!r}" if pair.clean else ""
    return f"pair {i}{text}: {n} tokens, {kind}"


def check_one_layout(pairs: list[PromptPair]) -> None:
    """Refuse pairs whose positions mean different tokens, naming the first two that differ."""
    first = layout(pairs[0])
    for i, p in enumerate(pairs[1:], start=1):
        if layout(p) != first:
            raise ValueError(
                "per-position sites average each position over prompts, but the positions mean different "
                f"tokens here:\n  {_describe(0, pairs[0])}\n  {_describe(i, p)}\n"
                "Fix: use prompts of one template (same length, corrupted tokens at the same positions), name "
                "the roles of each pair in the JSONL file (\"roles\": {\"S2\": 10, ...}) so that each role sits "
                "at one position, or screen at all positions (--positions all).")


def position_labels(pairs: list[PromptPair], tokenizer=None) -> list[str]:
    """One label per position of aligned pairs (see the module docstring); token ids without a tokenizer."""
    roles: dict[int, str] = {}
    for role, pos in pairs[0].roles or ():
        roles[pos] = f"{roles[pos]}/{role}" if pos in roles else role
    labels = []
    for pos, token in enumerate(pairs[0].clean_ids):
        if pos in roles:
            labels.append(roles[pos])
        elif all(len(p.clean_ids) > pos and p.clean_ids[pos] == token for p in pairs):
            labels.append(str(token) if tokenizer is None else tokenizer.decode([token]))
        else:
            labels.append(VARIES)
    return labels
