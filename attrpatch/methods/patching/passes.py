"""How exact patching lays patched copies out into forward passes, and what a pass costs.

A patched copy of the prompt batch needs only the blocks from its patch on (earlier blocks compute what
the receiving run computed) and, in a causal model, only the positions from its patch on, or from the first
position where the source and the receiving prompts differ (same_prefix), whichever is later. Copies are
grouped into passes of similar work (group_passes); each pass is counted in forward-equivalents of one
last-token forward of the same prompts (equivalents).
"""

import torch

from ...inputs.batch import PromptBatch
from ...model.sites import AFTER_ATTENTION, Component, ModelSpec

# prompt rows per patched forward pass when ``copies`` is not given: on a CPU, small passes stay in cache
# (scripts/bench.py: 32 rows ran ~1.5x faster per component than 256); a GPU wants them wide
DEFAULT_ROWS = {"cpu": 32, "cuda": 256}

# on a CPU, short prompts take more rows, up to this many tokens per pass (32 rows of 64 tokens): a pass's
# fixed cost (a Python call per block, hooks, the cache) is then shared by more copies
CPU_TOKENS = 2048


# and at most this many rows (a pass's logits are [rows, vocab]: 100 MB for SmolLM2's 49k-token vocabulary)
CPU_MAX_ROWS = 512


def default_rows(device: torch.device, n_pos: int) -> int:
    """Prompt rows per patched pass when ``copies`` is not given (DEFAULT_ROWS; more for short CPU prompts,
    and for passes that compute only the last ``n_pos`` positions)."""
    rows = DEFAULT_ROWS.get(device.type, 256)
    return min(max(rows, CPU_TOKENS // max(n_pos, 1)), CPU_MAX_ROWS) if device.type == "cpu" else rows


Item = Component | tuple[Component, ...]  # a tuple is patched jointly, in one copy


def members_of(item: Item) -> tuple[Component, ...]:
    return item if isinstance(item, tuple) else (item,)


def start_block(item: Item) -> int:
    """First block a patched run must compute: -1 (whole model) for the embeddings."""
    return min(-1 if c.site == "embed" else c.layer for c in members_of(item))


def whole_stream(item: Item) -> bool:
    """A patch of the entire residual stream at some layer (every position): the run becomes the source's."""
    return any(c.site in ("embed", "resid_pre") and c.pos is None for c in members_of(item))


def rows_in_first_block(components: list, group: list[int], first_pos: int, start: int, n_layers: int):
    """Rows block ``start`` must compute when every patch in the group sits after its attention at one
    position: the other positions' outputs of that block are the receiver's. None: all rows."""
    members = [c for i in group for c in members_of(components[i])]
    if first_pos == 0 or start >= n_layers - 1 or any(
            c.site not in AFTER_ATTENTION or c.pos is None or c.layer != start for c in members):
        return None
    return max(c.pos for c in members) - first_pos + 1


def first_position(item: Item, same: int = 0) -> int:
    """First position a patched run must compute: positions before it are unchanged (causal model), and so
    are the first ``same`` positions, where the source and the receiver run already agree (same_prefix)."""
    return max(same, min(0 if c.pos is None else c.pos for c in members_of(item)))


def no_op(c: Component, same: int) -> bool:
    """Patching ``c`` writes the receiver's own value: it sits at one of the first ``same`` positions."""
    return c.pos is not None and c.pos < same


def same_prefix(batch: PromptBatch) -> int:
    """Positions before this one hold the same token, and no added noise, in the clean and the corrupt prompt
    of every pair, so a causal model computes the same activations there in both runs: the source and the
    receiver agree, and patching those positions writes back what was there. At most n_pos - 1 (the last
    position is always computed). Needs aligned prompts (no padding)."""
    differ = batch.clean != batch.corrupt  # [batch, pos]
    if batch.noise is not None:
        differ = differ | (batch.noise != 0).any(-1)
    cols = differ.any(0).nonzero()
    return min(int(cols[0]) if len(cols) else batch.n_pos, batch.n_pos - 1)


def equivalents(share: float, starts: list[int], first_pos: int, n_layers: int, n_pos: int) -> float:
    """One patched pass in forward-equivalents, from the work it does: each copy runs the blocks from its own
    start on (copies join the pass at their block: run_blocks), at positions ``first_pos`` on, and pays the
    unembedding in full. The unit is one last-token forward of the same prompts; the split between blocks
    and unembedding is by weights (block_share). What it leaves out errs both ways and is small: the
    patched block's skipped rows and the final block's MLP on the last row only (counted, not run), and the
    per-block Python cost and the metrics' softmax (run, not counted). On SmolLM2's IOI screen at one
    thread this count is within 6% of verification cpu time / the unit forward's cpu time."""
    return sum(share * (n_layers - max(s, 0)) / n_layers * (n_pos - first_pos) / n_pos + 1 - share
               for s in starts)


def copy_cost(spec: ModelSpec, batch: PromptBatch, ablation: str | None = None):
    """What verifying one component alone costs: ``cost(c)`` = one patched copy's forward-equivalents
    (``equivalents``; 0 for a whole-stream patch, read off the source run), None for a component that cannot
    have an effect (``no_op``: it sits where the source and the receiver agree). As exact.patch lays it out."""
    aligned = batch.aligned
    same = same_prefix(batch) if aligned and ablation is None else 0
    share, n_layers, n_pos = block_share(spec, batch.n_pos), spec.dims.n_layers, batch.n_pos
    known: dict[tuple, float | None] = {}  # by (site, layer, pos): a screen prices every neuron of a site

    def price(c: Component) -> float | None:
        if no_op(c, same):
            return None
        if whole_stream(c) and ablation is None:
            return 0.0
        first = first_position(c, same) if aligned and start_block(c) >= 0 else 0
        return equivalents(share, [start_block(c)], first, n_layers, n_pos)

    def cost(c: Component) -> float | None:
        key = (c.site, c.layer, c.pos)
        if key not in known:
            known[key] = price(c)
        return known[key]
    return cost


def block_share(spec: ModelSpec, n_pos: int) -> float:
    """The blocks' share of one last-token forward's multiply-adds (the rest is the unembedding, which every
    patched copy pays in full however late it resumes): n_layers * n_pos * block weights against that plus
    the LM head's weights."""
    block = sum(p.numel() for p in spec.blocks[0].parameters())
    blocks = spec.dims.n_layers * n_pos * block
    head = spec.unembedding().weight.numel()
    return blocks / (blocks + head)


MAX_WASTE = 1.25  # a copy may compute at most this many times the positions it needs


def group_passes(components: list, todo: list[int], copies, n_pos: int | None, resume: bool = True,
            same: int = 0) -> list[list[int]]:
    """Split ``todo`` (sorted by whole-run, then first position, then layer) into patched passes of at most
    ``copies(first position of the pass)`` copies, each sorted by its first block (copies patched later join
    the pass there). A pass never mixes whole-model runs with resumed ones, and with position reuse
    (``n_pos`` given) a member computes at most MAX_WASTE times the positions its own patch needs (from
    ``same`` on at the earliest: first_position)."""
    def first(i: int) -> int:
        return first_position(components[i], same) if n_pos else 0
    order = sorted(todo, key=lambda i: (start_block(components[i]) < 0 or not resume, first(i), start_block(components[i]), i))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            head, item = components[groups[-1][0]], components[i]
            room = len(groups[-1]) < copies(first(groups[-1][0]))
            same_kind = (start_block(head) < 0) == (start_block(item) < 0)
            near = n_pos is None or (n_pos - first(groups[-1][0])) <= MAX_WASTE * (n_pos - first(i))
            if room and same_kind and near:
                groups[-1].append(i)
                continue
        groups.append([i])
    return [sorted(group, key=lambda i: (start_block(components[i]), i)) for group in groups]


def copy_entries(components: list, group: list[int], same: int = 0) -> dict[tuple[str, int], list[tuple[int, Component]]]:
    """What each copy of a pass patches, by hook point: {(site, layer): [(copy, member)]}, copies numbered in
    ``group``'s order; members inside the shared prefix (no_op) write nothing and are left out."""
    entries: dict[tuple[str, int], list[tuple[int, Component]]] = {}
    for copy, i in enumerate(group):
        for c in members_of(components[i]):
            if not no_op(c, same):
                entries.setdefault((c.site, c.layer), []).append((copy, c))
    return entries
