"""Point labels without overlaps, placed with the renderer's own text extents.

Each label tries offsets around its point, nearest first (farther ones with a leader line), and takes the
first whose box, as the renderer measures it, stays inside the axes, clear of every label placed before
and of every point drawn in the axes (each point a disc of its marker's radius). A label that finds no
place is left out and counted.
"""

import math

import numpy as np

from .run import _short
from .style import FLAG_C

CHAR_W, LINE_H = 0.6, 1.15  # a label's box in font sizes (DejaVu Sans), for callers sizing a figure ahead
RADII = (4, 9, 15, 24, 36)  # offsets of a label from its point, in points; beyond the first, a leader line
OFFSETS = tuple((round(r * math.cos(t), 1), round(r * math.sin(t), 1)) for r in RADII
                for t in np.linspace(0, 2 * math.pi, 12 if r > 4 else 8, endpoint=False))
POINT_PAD = 1.0  # points of clearance around each marker


def _anchor(dx: float, dy: float) -> tuple[str, str]:
    """Alignment that puts the label on the side of its offset, away from the point."""
    ha = "left" if dx > 0.5 else "right" if dx < -0.5 else "center"
    va = "bottom" if dy > 0.5 else "top" if dy < -0.5 else "center"
    return ha, va


def renderer_of(fig):
    """The figure's renderer (an Agg canvas is attached to a bare Figure)."""
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        FigureCanvasAgg(fig)
    return fig.canvas.get_renderer()


def point_discs(ax) -> list[tuple[float, float, float]]:
    """(x, y, radius) in display pixels of every point of the axes' scatter collections."""
    scale = ax.figure.dpi / 72
    discs = []
    for coll in ax.collections:
        offsets = np.asarray(coll.get_offsets(), float)
        if not len(offsets):
            continue
        sizes = np.broadcast_to(np.asarray(coll.get_sizes(), float) if len(coll.get_sizes()) else [9.0],
                                (len(offsets),))
        xy = coll.get_offset_transform().transform(offsets)
        for (x, y), s in zip(xy, sizes):
            if np.isfinite(x) and np.isfinite(y):
                discs.append((float(x), float(y), (math.sqrt(s) / 2 + POINT_PAD) * scale))
    return discs


def _text_extent(note, renderer):
    """The box of an annotation's text alone (Annotation's own extent includes its leader line)."""
    from matplotlib.text import Text
    note.update_positions(renderer)  # where its offset puts it now (Annotation's own extent does this first)
    return Text.get_window_extent(note, renderer)


def covers(box, disc) -> bool:
    """Whether a label box (x0, y0, x1, y1) touches a disc (x, y, r)."""
    x, y, r = disc
    nx, ny = min(max(x, box[0]), box[2]), min(max(y, box[1]), box[3])
    return (nx - x) ** 2 + (ny - y) ** 2 < r * r


def intersect(a, b) -> bool:
    return not (a[2] <= b[0] or a[0] >= b[2] or a[3] <= b[1] or a[1] >= b[3])


def place_labels(ax, points, texts, color="black", max_labels: int = 8, fontsize: float = 7,
                 keep_clear=()) -> int:
    """Name points (in priority order) without overlaps; returns how many were left unnamed. Run the
    figure's layout first (:func:`.style._layout`): boxes are measured where the axes finally are.
    ``keep_clear``: other texts of the axes that labels must not cover."""
    renderer = renderer_of(ax.figure)
    ax.apply_aspect()  # an equal-aspect axes shrinks to its box at draw time: measure where it will be
    frame = ax.get_window_extent(renderer)
    discs, named = point_discs(ax), 0
    boxes = [tuple(t.get_window_extent(renderer).extents) for t in keep_clear]
    finite = [(x, y, t) for (x, y), t in zip(points, texts) if math.isfinite(x) and math.isfinite(y)]
    for x, y, text in finite:
        if named >= max_labels:
            break
        for dx, dy in OFFSETS:
            ha, va = _anchor(dx, dy)
            far = math.hypot(dx, dy) > RADII[0] + 1
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                               fontsize=fontsize, color=color, zorder=5, annotation_clip=False,
                               arrowprops=dict(arrowstyle="-", lw=0.4, color=color, shrinkA=0, shrinkB=2)
                               if far else None)
            note.set_in_layout(False)
            bb = _text_extent(note, renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            inside = box[0] >= frame.x0 and box[1] >= frame.y0 and box[2] <= frame.x1 and box[3] <= frame.y1
            if inside and not any(intersect(box, b) for b in boxes) and not any(covers(box, d) for d in discs):
                boxes.append(box)
                named += 1
                break
            note.remove()
    return len(finite) - named


def label_boxes(ax) -> list[tuple[float, float, float, float]]:
    """The display boxes of the axes' point labels (annotations), as the renderer measures them."""
    renderer = renderer_of(ax.figure)
    return [tuple(_text_extent(t, renderer).extents) for t in ax.texts if hasattr(t, "xyann")]


def _label_points(ax, comps: list[dict], xs, ys, max_labels: int) -> int:
    """Name the components farthest from the diagonal first, and count the rest in a corner note that no
    label covers; returns how many were left unnamed."""
    order = sorted(range(len(comps)), key=lambda i: -abs(ys[i] - xs[i]))
    note = ax.text(0.98, 0.02, f"+{len(comps)} more flagged", transform=ax.transAxes, ha="right", va="bottom",
                   fontsize=7, color=FLAG_C)  # as wide as it can get: the labels keep clear of it
    rest = place_labels(ax, [(xs[i], ys[i]) for i in order], [_short(comps[i]) for i in order], FLAG_C,
                        max_labels, keep_clear=[note] if len(comps) > max_labels else [])
    if rest:
        note.set_text(f"+{rest} more flagged")
    else:
        note.remove()
    return rest
