"""report.md's findings: one line per site, a short table per site of its top components (groups of
components that carry the same effect in one row, analysis/groups.py), the disagreements in one compact
table. Rendered from the report dict alone; the full evidence stays in report.json."""

from collections import Counter

from ..analysis.causes import NO_CAUSE, NOT_MEASURED, removed_share
from ..analysis.flags import APPROX_FLAGS
from ..analysis.groups import group_components
from .markdown import ci, group_name, name, num, span, table

SITE_ROWS = 5  # rows of each site's table
DISAGREEMENT_ROWS = 15  # rows of the disagreement table
SITE_WORDS = {"resid_pre": "residual stream", "attn_out": "attention outputs", "mlp_out": "MLP outputs",
              "head": "attention heads", "neuron": "MLP neurons", "embed": "embeddings", "q": "queries",
              "k": "keys", "v": "values"}


def groups_of(r: dict) -> list[dict]:
    """The report's groups (older reports: computed from its components)."""
    return r["groups"] if "groups" in r else group_components(r["components"])


def rows_of(comps: list[dict], groups: list[dict]) -> list[list[dict]]:
    """``comps`` as rows: each group's members together (when present), every other component alone;
    largest |exact| first."""
    by_name = {c["name"]: c for c in comps}
    rows, taken = [], set()
    for g in groups:
        members = [by_name[n] for n in g["members"] if n in by_name]
        if len(members) == len(g["members"]) and not taken & set(g["members"]):
            rows.append(members)
            taken |= set(g["members"])
    rows += [[c] for c in comps if c["name"] not in taken]
    return sorted(rows, key=lambda row: -max(abs(c["exact"]) for c in row))


def _label(row: list[dict], groups: list[dict], tokens) -> str:
    if len(row) == 1:
        return name(row[0], tokens)
    names = [c["name"] for c in row]
    return group_name(next(g for g in groups if g["members"] == names), tokens)


def _each(values: list[float], digits: int = 3) -> str:
    return num(values[0], digits) if len(values) == 1 else span(values, 2) + " each" * (
        num(min(values), 2) == num(max(values), 2))


def share(norm: float) -> str:
    """A normalised effect as a share of the clean - corrupt gap: '98%', '0.4%'."""
    x = abs(norm)
    return "n/a" if x != x else f"{x:.0%}" if x >= 0.095 else f"{x:.1%}"


def span_of(norms: list[float]) -> str:
    """Shares of the gap as one number or "low to high"."""
    low, high = share(min(norms, key=abs)), share(max(norms, key=abs))
    return low if low == high else f"{low} to {high}"


def fn_words(fn: dict) -> str:
    """The false-negative statement of one site (analysis/agreement.py FalseNegatives)."""
    if "verdict" not in fn:  # a report written before the statement existed
        return f"<= {fn['fraction']:.0%} of {fn['n_unverified']} unverified exceed |{fn['max_control']:.3g}|"
    m, n, t, up = fn["n_unverified"], fn["n_control"], fn["threshold"], fn["count_upper"]
    if fn["verdict"] == "all_verified":
        return "none: every component was verified"
    if fn["verdict"] == "no_control":
        return f"cannot bound: no control sample for the {m} unverified (--random-k)"
    seen = f"{fn['n_control_above']} of {n} random controls exceed {t:.3g}"
    if fn["verdict"] == "bounded":
        words = f"{seen}; with 95% confidence at most {up} of the {m} unverified do"
    elif fn["n_control_above"]:
        words = f"cannot bound: {seen}, so AtP missed some; up to {up} of the {m} unverified could"
    else:
        words = (f"cannot bound: {n} controls are too few for {m} unverified ({seen}, yet up to {up} unverified "
                 f"could, more than the {fn['n_verified_above']} verified that do; about {fn['controls_needed']} "
                 f"controls would bound it)")
    beat = f"; {fn['exceeding_top']} control(s) beat the weakest top-k" if fn["exceeding_top"] else ""
    return words + beat


def site_lines(r: dict, direction: str) -> list[str]:
    """One line per site: what was found, how far AtP can be trusted there, what it may have missed."""
    m, lines = r["metric"], []
    groups = [g for g in groups_of(r) if g["direction"] == direction]
    for site, per_metric in r["agreement"][direction].items():
        comps = [c for c in r["components"] if c["direction"] == direction and c["site"] == site]
        fn, a = r["false_negatives"][direction][site], per_metric[m]
        if not comps:
            continue
        top = rows_of(comps, groups)[0]
        best = max(top, key=lambda c: abs(c["exact"]))
        flags = Counter(f for c in comps for f in c["flags"] if f in APPROX_FLAGS)
        said = ", ".join(f"{k} {v}" for k, v in flags.most_common()) or "none"
        total = len(comps) + fn["n_unverified"]
        none = ((r.get("verification") or {}).get(direction) or {}).get(site, {}).get("no_effect", 0)
        count = f"all {total} that can have an effect verified, of {total + none}" if none else \
            f"{len(comps)} of {total} verified"
        lines.append(f"- **{site}** ({SITE_WORDS.get(site, site)}; {count}): strongest "
                     f"{_label(top, groups, r.get('tokens'))}, exact {_each([c['exact'] for c in top])} "
                     f"({share(best['exact_norm'][m])} of the gap), AtP {_each([c['approx'] for c in top])}. "
                     f"AtP vs exact: Pearson {num(a['pearson'], 2)}, recall@{a['k']} {a['recall_at_k']:.2f}; "
                     f"disagreements: {said}. False negatives: {fn_words(fn)}.")
    return lines + [""]


def site_tables(r: dict, direction: str) -> list[str]:
    """A short table per site of its top components by |exact|, ranks within the site."""
    m, lines = r["metric"], []
    groups = [g for g in groups_of(r) if g["direction"] == direction]
    for site in r["agreement"][direction]:
        comps = [c for c in r["components"] if c["direction"] == direction and c["site"] == site]
        if not comps:
            continue
        rows = rows_of(comps, groups)
        how = ((r.get("verification") or {}).get(direction) or {}).get(site, {}).get("mode")
        lines += [f"#### {site}: top {min(SITE_ROWS, len(rows))} of {len(comps)} verified"
                  + (" (exhaustive: the exact top list)" if how == "exhaustive" else ""), ""]
        lines += table(["component", "AtP", "exact [95% CI]", "share of gap", f"rank in {site}: AtP / exact",
                        "flags"], [_site_row(row, groups, r.get("tokens"), m) for row in rows[:SITE_ROWS]])
    return lines


def _ranks(row: list[dict], key: str) -> str:
    values = [c[key] for c in row]
    return str(values[0]) if len(values) == 1 else f"{min(values)}-{max(values)}"


def _site_row(row: list[dict], groups: list[dict], tokens, m: str) -> list:
    flags = ", ".join(dict.fromkeys(f for c in row for f in c["flags"])) or "-"
    exact = ci(row[0], "exact", 3) if len(row) == 1 else _each([c["exact"] for c in row])
    return [_label(row, groups, tokens), _each([c["approx"] for c in row]), exact,
            span_of([c["exact_norm"][m] for c in row]),
            f"{_ranks(row, 'rank_approx')} / {_ranks(row, 'rank_exact')}", flags]


CAUSE_WORDS = (  # the opening of a cause in analysis/causes.py or flags.py, its short name in the table
    ("attention pattern change", "attention patterns"), ("norm scale change", "norm scales"),
    ("neither frozen", "MLPs or several parts"), ("bend near the receiver", "bend in alpha 0..1/2"),
    ("curvature", "curvature"), ("non-linearity along the straight path", "path (IG right)"),
    ("interaction", "interaction (IG off too)"), ("attention saturation", "saturation"),
    ("large activation change", "activation change"), ("early-layer", "layer 0"),
    ("metric non-linearity", "metric non-linearity"), ("backup behaviour", "backup"), (NO_CAUSE, "none found"),
    (NOT_MEASURED, "not measured"))


def short_cause(causes: list[str], most: int = 2) -> str:
    """The first ``most`` causes by their short names (the whole sentence is in report.json)."""
    short = [next((word for opening, word in CAUSE_WORDS if c.startswith(opening)), c[:30]) for c in causes]
    return ", ".join(list(dict.fromkeys(short))[:most]) or "-"


FROZEN_SHORT = {"pattern": "patterns", "norm": "norms"}


def freeze_removed(row: list[dict]) -> str:
    """The share of AtP's error each freeze removed (methods/patching/frozen.py), as a range over a group."""
    shares: dict[str, list[float]] = {}
    for c in row:
        for freeze, (slope, effect) in (c["evidence"].get("frozen") or {}).items():
            shares.setdefault(freeze, []).append(removed_share(c["exact"], c["approx"], slope, effect))
    words = []
    for freeze, values in shares.items():
        low, high = min(values), max(values)
        amount = f"{low:.0%}" if round(low, 2) == round(high, 2) else f"{low:.0%} to {high:.0%}"
        words.append(f"{FROZEN_SHORT.get(freeze, freeze)} {amount}")
    return ", ".join(words) or "-"


def _flagged_rows(r: dict) -> dict[str, dict[str, tuple]]:
    """{row label: {direction: (members, flagged members)}} of the components with an APPROX flag: one row
    per component, except that one site at one position flagged at consecutive layers with the same likely
    cause (in either direction) is one row."""
    flagged = [c for c in r["components"] if set(c["flags"]) & set(APPROX_FLAGS)]
    by_key: dict = {}
    for c in flagged:
        key = (c["site"], c["pos"], short_cause(c["causes"])) if c["pos"] is not None else (c["name"],)
        by_key.setdefault(key, []).append(c)
    out: dict[str, dict[str, tuple]] = {}
    for members in by_key.values():
        layers = sorted({c["layer"] for c in members})
        runs = [[layers[0]]]
        for layer in layers[1:]:
            runs[-1].append(layer) if layer == runs[-1][-1] + 1 else runs.append([layer])
        for run in runs:
            row = [c for c in members if c["layer"] in run]
            c = row[0]
            label = name(c, r.get("tokens")) if len(run) == 1 else group_name(
                {"layers": [run[0], run[-1]], "site": c["site"], "pos": c["pos"], "members": run}, r.get("tokens"))
            for direction in r["directions"]:
                mine = [e for e in row if e["direction"] == direction]
                if mine:
                    out.setdefault(label, {})[direction] = (mine, mine)
    return out


def disagreement_table(r: dict) -> list[str]:
    """Every component whose AtP and exact effect disagree, one row for both directions: AtP and exact as
    "denoise / noise" when the screen ran both."""
    found = _flagged_rows(r)
    if not found:
        return ["No verified component has a sign flip, a large error or a missed rank.", ""]
    dirs = r["directions"]

    def size(per):
        return -max(abs(c["exact"] - c["approx"]) for _, flagged in per.values() for c in flagged)

    def per_dir(per, key):
        return " / ".join(_each([c[key] for c in per[d][0]]) if d in per else "-" for d in dirs)

    rows = []
    for label, per in sorted(found.items(), key=lambda kv: size(kv[1])):
        flagged = [c for d in dirs if d in per for c in per[d][1]]
        first = per[next(d for d in dirs if d in per)][0]
        rows.append([label, ", ".join(dict.fromkeys(f for c in flagged for f in c["flags"] if f in APPROX_FLAGS)),
                     per_dir(per, "approx"), per_dir(per, "exact"),
                     short_cause(max(first, key=lambda c: abs(c["exact"]))["causes"]), freeze_removed(flagged)])
    both = f" ({' / '.join(dirs)})" if len(dirs) > 1 else ""
    out = table(["component", "flags", f"AtP{both}", f"exact{both}", "likely cause", "error removed by freezing"],
                rows[:DISAGREEMENT_ROWS])
    more = len(rows) - DISAGREEMENT_ROWS
    note = f"{more} more rows not shown; " if more > 0 else ""
    return out + [f"{note}every cause in full with its numbers: report.json, `components[].causes` and "
                  "`components[].evidence`.", ""]
