"""Point labels without overlaps, placed from estimated text boxes (no renderer needed)."""

import math

from .run import _short
from .style import FLAG_C


CHAR_W, LINE_H = 0.6, 1.15  # label box estimate, in font sizes (DejaVu Sans)
OFFSETS = ((3, 3, "left", "bottom"), (-3, 3, "right", "bottom"), (3, -3, "left", "top"),
           (-3, -3, "right", "top"), (0, 5, "center", "bottom"), (0, -5, "center", "top"),
           (6, 0, "left", "center"), (-6, 0, "right", "center"), (10, 9, "left", "bottom"),
           (-10, 9, "right", "bottom"), (10, -9, "left", "top"), (-10, -9, "right", "top"))


def place_labels(ax, points, texts, color="black", max_labels: int = 8, fontsize: float = 7) -> int:
    """Name points without overlaps: each label takes the first offset around its point whose box
    (estimated from the text length) stays inside the axes and clear of the labels and named points
    placed before it. Points come in priority order. Returns how many were left unnamed. Run the
    figure's layout first (:func:`.style._layout`) so that the axes sizes the estimate uses are final."""
    fig = ax.figure
    pos = ax.get_position()
    w, h = pos.width * fig.get_figwidth() * 72, pos.height * fig.get_figheight() * 72
    if ax.get_aspect() == 1.0:
        w = h = min(w, h)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    logx = ax.get_xscale() == "log"

    def to_pt(x, y):
        if logx:
            x, x0_, x1_ = math.log10(x), math.log10(x0), math.log10(x1)
        else:
            x0_, x1_ = x0, x1
        return (x - x0_) / (x1_ - x0_) * w, (y - y0) / (y1 - y0) * h

    pts = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    boxes = [(px - 2, py - 2, px + 2, py + 2) for px, py in (to_pt(x, y) for x, y in pts[:50])]
    named = 0
    for (x, y), text in zip(points, texts):
        if named >= max_labels or not (math.isfinite(x) and math.isfinite(y)):
            continue
        px, py = to_pt(x, y)
        tw, th = CHAR_W * fontsize * len(text), LINE_H * fontsize
        for dx, dy, ha, va in OFFSETS:
            left = px + dx - (tw if ha == "right" else tw / 2 if ha == "center" else 0)
            bottom = py + dy - (th if va == "top" else th / 2 if va == "center" else 0)
            box = (left, bottom, left + tw, bottom + th)
            inside = box[0] >= 0 and box[1] >= 0 and box[2] <= w and box[3] <= h
            clear = all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in boxes)
            if inside and clear:
                far = abs(dx) + abs(dy) > 10
                ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                            fontsize=fontsize, color=color, zorder=5,
                            arrowprops=dict(arrowstyle="-", lw=0.4, color=color, shrinkA=0, shrinkB=2)
                            if far else None)
                boxes.append(box)
                named += 1
                break
    return sum(1 for x, y in points if math.isfinite(x) and math.isfinite(y)) - named


def _label_points(ax, comps: list[dict], xs, ys, max_labels: int) -> int:
    """Name the components farthest from the diagonal first; returns how many were left unnamed."""
    order = sorted(range(len(comps)), key=lambda i: -abs(ys[i] - xs[i]))
    return place_labels(ax, [(xs[i], ys[i]) for i in order], [_short(comps[i]) for i in order], FLAG_C,
                        max_labels)
