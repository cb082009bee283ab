"""Markdown pieces every report.md shares: numbers, component names with their position's token, intervals,
tables. Pure string formatting."""

import math


def num(x, digits: int = 3) -> str:
    """A signed number, "n/a" when missing or not finite."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if isinstance(x, float) else str(x)


def span(values: list[float], digits: int = 2) -> str:
    """One number when the values agree to ``digits``, else "low to high"."""
    low, high = num(min(values), digits), num(max(values), digits)
    return low if low == high else f"{low} to {high}"


def token(tokens: list | None, pos) -> str | None:
    """The token (or role) at ``pos``, stripped, or None."""
    if pos is None or not tokens or pos >= len(tokens):
        return None
    return tokens[pos].strip() or repr(tokens[pos])


def name(c: dict, tokens: list | None) -> str:
    """A component's name, with the token (or role) of its position: 'L0.resid_pre@9 (S2)'."""
    word = token(tokens, c.get("pos"))
    return c["name"] if word is None else f"{c['name']} ({word})"


def group_name(g: dict, tokens: list | None) -> str:
    """A group's name: 'L0-L19.resid_pre@9 (S2), 20 layers'."""
    word = token(tokens, g["pos"])
    where = f"L{g['layers'][0]}-L{g['layers'][1]}.{g['site']}@{g['pos']}"
    return f"{where}{'' if word is None else f' ({word})'}, {len(g['members'])} layers"


def ci(stats: dict, key: str, digits: int = 2) -> str:
    """A statistic with its 95% bootstrap interval over prompt pairs, when the report has one."""
    interval = stats.get(f"{key}_ci")
    value = num(stats[key], digits)
    return value if not interval else f"{value} [{num(interval[0], digits)}, {num(interval[1], digits)}]"


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return out + [""]
