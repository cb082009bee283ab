"""Groups: verified components that carry the same effect, reported as one finding (report.md shows one row,
report.json lists every member). Pure: reads the findings' entries (findings.site_results), no model.

A group is a run of components of one residual-like site (resid_pre, attn_out, mlp_out, ...) at one
position, in one direction, at consecutive layers (every layer between verified), of one sign, whose exact
effects under the primary metric lie within GROUP_TOL of the group's largest |effect|:

    max |exact| - min |exact| <= GROUP_TOL * max |exact|          (same sign throughout)

e.g. the residual stream at S2 from L0 to L19 (exact +10.2 each) when the name is carried there unchanged.
Runs are grown greedily from the lowest layer; a component joins the run before it when the run stays
within the tolerance. A run of one is no group.
"""

from ..model.sites import RESID_LIKE

GROUP_TOL = 0.1  # the spread of |exact| a group may have, as a share of its largest |exact|


def _fits(run: list[dict], c: dict, tol: float) -> bool:
    last = run[-1]
    if c["layer"] != last["layer"] + 1 or (c["exact"] > 0) != (run[0]["exact"] > 0):
        return False
    sizes = [abs(e["exact"]) for e in run] + [abs(c["exact"])]
    return max(sizes) - min(sizes) <= tol * max(sizes)


def group_components(comps: list[dict], tol: float = GROUP_TOL) -> list[dict]:
    """The groups among ``comps`` (report entries), each {"direction", "site", "pos", "layers": [first, last],
    "members": [names, by layer], "exact": [min, max], "approx": [min, max]}, largest |exact| first."""
    by_place: dict = {}
    for c in comps:
        if c["site"] in RESID_LIKE and c.get("pos") is not None and c["exact"] == c["exact"]:
            by_place.setdefault((c["direction"], c["site"], c["pos"]), []).append(c)
    groups = []
    for (direction, site, pos), members in by_place.items():
        members.sort(key=lambda c: c["layer"])
        runs = [[members[0]]]
        for c in members[1:]:
            if _fits(runs[-1], c, tol):
                runs[-1].append(c)
            else:
                runs.append([c])
        for run in runs:
            if len(run) < 2:
                continue
            exact, approx = [c["exact"] for c in run], [c["approx"] for c in run]
            groups.append({"direction": direction, "site": site, "pos": pos,
                           "layers": [run[0]["layer"], run[-1]["layer"]], "members": [c["name"] for c in run],
                           "exact": [min(exact), max(exact)], "approx": [min(approx), max(approx)]})
    groups.sort(key=lambda g: -max(abs(v) for v in g["exact"]))
    return groups
