"""Exact activation patching: the ground truth AtP approximates.

effect(c) = metric(receiver run with c set to its source value) - metric(receiver run), mean over prompts;
denoise: source = clean, receiver = corrupt; noise: the reverse (inputs/directions.py).

Batched and layer-resumed: components are sorted by layer and patched ``copies`` at a time, each copy of
the prompt batch carrying a different patch, in one forward pass that starts at the block of the
earliest patched layer from the receiver's recorded input to that block (the blocks before it would
compute exactly the same thing). ``resume=False, copies=1`` is the naive one-full-forward-per-component
sweep, kept as the reference.

Ablations (``ablation=``) patch a component of the clean run with a value that is no run's, always in
the noising direction (receiver = clean; effect = metric(clean, c ablated) - metric(clean): is c
necessary?): ``zero`` (0), ``mean`` (the clean run's mean over the batch's prompts, per position) or
``resample`` (another prompt's clean value: prompt i takes prompt i + 1's, the last the first's). They
answer what c contributes against a baseline, not against a corrupted prompt, and are labelled as
ablations, not patches.
"""

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...engine.forward import block_calls, forward_last
from ...engine.hooks import batch_pos, call_input, eval_mode, hooked, record
from ...engine.metrics import Target, check_metric, metric, metric_values, wide
from ...engine.partial import run_blocks
from ...inputs.batch import PromptBatch, fingerprint
from ...inputs.directions import check_direction, clean_and_corrupt
from ...model.sites import Component, ModelSpec, as_spec, check_component
from ..ablation import ablated_values
from ..halving import halve
from .passes import (Item, members_of, rows_in_first_block, start_block, whole_stream, block_share, default_rows,
                     copy_entries, equivalents, first_position, group_passes, no_op, same_prefix)



@dataclass
class Effects:
    """Exact effects. ``values``: float32 (float64 for float64 models) [component, metric], mean over prompts; ``per_prompt``:
    [component, metric, batch] when asked; ``receiver_metric``: the unpatched receiving run's metric."""

    components: list[Component | tuple[Component, ...]]
    metrics: list[str]
    values: Tensor
    direction: str
    receiver_metric: dict[str, float]
    per_prompt: Tensor | None = None
    passes: dict[str, float] = field(default_factory=dict)

    def effect(self, component: Component | tuple[Component, ...], metric_name: str) -> float:
        return float(self.values[self.components.index(component), self.metrics.index(metric_name)])


def patch(model: nn.Module | ModelSpec, batch: PromptBatch, components: Sequence[Item], *,
          metrics: Sequence[str] = ("logit_diff",), direction: str = "denoise", copies: int | None = None,
          resume: bool = True, batch_size: int | None = None, per_prompt: bool = False,
          alpha: float = 1.0, progress: bool = False, ablation: str | None = None, runs: dict | None = None) -> Effects:
    """Exact effect of patching each of ``components`` alone, under every metric, in ``direction``.

    components: Components, or tuples of Components to patch together (e.g. a sliding window of layers).

    copies: patched copies of the prompt chunk per forward pass (default: default_rows(device, positions the
        pass computes) // chunk size).
    resume: start each pass at the earliest patched block instead of the embeddings; a copy patched at a later
        block joins the pass there.
    alpha: patch a_receiver + alpha (a_source - a_receiver) (1: the source value; 0.5 measures curvature).
    ablation: zero | mean | resample: the source is that ablation of the clean run (module docstring);
        needs direction="noise".
    runs: a dict shared by patch calls on the same prompts: a call takes its source and receiving runs from
        it when they cover its hook points (fingerprinted prompts, same direction), else makes them and
        stores them there; ``passes["runs"]`` counts only the runs made.
    """
    spec = as_spec(model)
    components, metrics = list(components), list(dict.fromkeys(metrics))
    check_direction(direction)
    for m in metrics:
        check_metric(m)
    members = [c for item in components for c in members_of(item)]
    for c in members:
        check_component(c, spec, batch.n_pos)
    if not batch.aligned and any(c.pos is not None for c in members):
        raise ValueError("per-position components need prompts of one token length, but lengths range over "
                         f"{sorted(set((batch.last + 1).tolist()))}; use all-position components "
                         "(pos=None) or prompts of equal length")
    batch = batch.to(spec.device)
    fixed = None if ablation is None else ablated_values(spec, batch, members, ablation, direction, batch_size)
    acc = wide(next(spec.model.parameters()).dtype)  # float32, float64 for float64 models
    sums = torch.zeros(len(components), len(metrics), device=spec.device, dtype=acc)
    prompts = torch.zeros(len(components), len(metrics), batch.n, device=spec.device, dtype=acc) if per_prompt else None
    receiver = {m: 0.0 for m in metrics}
    passes = {"patched_rows": 0.0, "forward_equivalents": 0.0, "runs": 0.0}
    start = 0
    with eval_mode(spec.model), torch.no_grad():
        for chunk in batch.chunks(batch_size):
            def n_copies(first_pos: int, n: int = chunk.n) -> int:
                """Copies per pass for passes computing positions ``first_pos`` on."""
                return copies or max(1, default_rows(spec.device, batch.n_pos - first_pos) // n)
            rows = None if fixed is None else {key: t[start:start + chunk.n] for key, t in fixed.items()}
            effects, base = _patch_chunk(spec, chunk, components, metrics, direction, n_copies, resume,
                                         passes, progress, alpha, rows, runs)  # effects: [component, metric, chunk]
            sums += effects.sum(-1)
            if prompts is not None:
                prompts[..., start:start + chunk.n] = effects
            for m in metrics:
                receiver[m] += base[m]
            start += chunk.n
    return Effects(components=components, metrics=metrics, values=sums.cpu() / batch.n, direction=direction,
                   receiver_metric={m: receiver[m] / batch.n for m in metrics},
                   per_prompt=None if prompts is None else prompts.cpu(), passes=passes)


def _source_values(spec: ModelSpec, batch: PromptBatch, ids, points: dict,
                   cache: dict | None = None) -> tuple[dict, Tensor]:
    """A run's values at each hook point (normalised views [batch, pos, ...], copied) and its last-token
    logits [batch, vocab]; ``cache["cache"]`` receives its key/value cache when given (forward_last's keep)."""
    source: dict[tuple[str, int], Tensor] = {}
    with hooked(record(points, source, batch.n_pos, Tensor.clone)):
        logits = forward_last(spec, ids, batch.mask, batch.last, cache)
    return source, logits


def _runs(spec: ModelSpec, batch: PromptBatch, direction: str, points: dict, first: int, reuse_pos: bool,
          memo: dict | None) -> tuple[dict, int]:
    """The source run ("source": values at ``points``, "source_logits") and the receiving run ("receiver",
    "receiver_logits", "calls": its block calls from "first" on, "cache": its key/value cache or None), and
    how many runs were made: none when ``memo`` holds them for these prompts and direction, covering
    ``points``, ``first`` and the cache; else both, stored in ``memo`` (the receiver's values at ``points``
    are kept only then: the diagnostics read them)."""
    key = (direction, fingerprint(batch))
    found = None if memo is None else memo.get(key)
    if (found is not None and set(points) <= set(found["source"]) and found["first"] <= first
            and (found["cache"] is not None or not reuse_pos)):
        return found, 0
    source_ids, receiver_ids = batch.runs(direction)
    source, source_logits = _source_values(spec, batch, source_ids, points)
    kept: dict = {}
    with block_calls(spec, first) as calls:
        receiver, receiver_logits = _source_values(spec, batch, receiver_ids, points if memo is not None else {},
                                                   kept if reuse_pos else None)  # its values: for diagnostics
    run = {"source": source, "source_logits": source_logits, "receiver": receiver, "receiver_logits": receiver_logits,
           "calls": calls, "cache": kept.get("cache"), "first": first}
    if memo is not None:
        memo[key] = run
    return run, 2


def _patch_chunk(spec: ModelSpec, batch: PromptBatch, components: list[Component], metrics: list[str],
                 direction: str, copies, resume: bool, passes: dict, progress: bool, alpha: float, fixed=None,
                 memo: dict | None = None):
    receiver_ids = batch.runs(direction)[1]
    n_pos, n_layers = batch.n_pos, spec.dims.n_layers
    points = {key: spec.hook_point(*key) for key in sorted({(c.site, c.layer) for item in components
                                                            for c in members_of(item)})}
    # The receiver's metric is the baseline; its block inputs are where patched runs resume.
    first = max(0, min(start_block(c) for c in components)) if components else 0
    # reuse positions only where every prompt has every position (no padding: causal reuse is exact)
    # an ablation's values differ from the receiver's everywhere: no shared prefix then
    same = same_prefix(batch) if resume and batch.aligned and fixed is None else 0
    reuse_pos = resume and batch.aligned and any(first_position(item, same) > 0 for item in components)
    run, made = _runs(spec, batch, direction, points, first, reuse_pos, memo)
    _count(passes, runs=made)  # the source and the receiving run, whole forwards each (none when shared)
    share = block_share(spec, n_pos)
    source = run["source"] if fixed is None else fixed  # an ablation's values: no run's (its logits unused)
    source_logits, receiver_logits, calls, kept = (run["source_logits"], run["receiver_logits"], run["calls"],
                                                   {"cache": run["cache"]})
    clean_logits, _ = clean_and_corrupt(direction, source_logits, receiver_logits)
    target = Target.from_clean(batch.answer, batch.wrong, clean_logits)
    base = {m: metric(m, receiver_logits, target) for m in metrics}  # [batch]

    effects = torch.zeros(len(components), len(metrics), batch.n, device=batch.clean.device,
                          dtype=wide(receiver_logits.dtype))
    # Patching the whole stream (embeddings, or resid_pre at every position) makes the rest of the run the
    # source run: its effect is read off the source's logits, with no pass at all.
    whole = [i for i, item in enumerate(components) if resume and alpha == 1 and fixed is None and whole_stream(item)]
    for j, m in enumerate(metrics if whole else ()):
        effects[whole, j] = (metric(m, source_logits, target) - base[m]).to(effects.dtype)
    # patches of the shared prefix only change nothing: their effect is 0, with no pass
    skip = set(whole) | {i for i, item in enumerate(components) if all(no_op(c, same) for c in members_of(item))}
    groups = group_passes(components, [i for i in range(len(components)) if i not in skip], copies,
                          n_pos if reuse_pos else None, resume, same)

    def run_group(group: list[int]) -> tuple[Tensor, list[int], int]:
        """One patched pass: last-token logits [len(group) * batch, vocab], each copy's start block, first pos."""
        n = len(group)
        entries = copy_entries(components, group, same)
        starts = [start_block(components[i]) for i in group]  # ascending (group_passes): copies join the pass as it goes
        start = starts[0]
        first_pos = min(first_position(components[i], same) for i in group) if reuse_pos and start >= 0 else 0
        rows = rows_in_first_block(components, group, first_pos, start, n_layers) if resume else None
        seen = rows or n_pos - first_pos  # positions the patched modules see in this pass
        hooks = [(points[key], patcher(points[key], source[key], found, batch.n, seen, first_pos, alpha))
                 for key, found in entries.items()]
        with hooked(hooks):
            if start < 0 or not resume:
                return forward_last(spec, receiver_ids.repeat(n), batch.mask.repeat(n, 1),
                                    batch.last.repeat(n)), [0] * n, 0
            hidden = call_input(*calls[start])[0][:, first_pos:]
            return run_blocks(spec, start, hidden.repeat(starts.count(start), 1, 1), calls, n, batch.n, batch.last,
                              first_pos, kept.get("cache"), rows, any(k[1] == n_layers - 1 for k in entries),
                              starts), starts, first_pos

    bar = tqdm(total=sum(map(len, groups)), desc="exact patching", disable=not progress)
    while groups:
        group = groups.pop(0)
        try:
            logits, starts, first_pos = run_group(group)
        except torch.OutOfMemoryError:
            if len(group) == 1:
                raise
            groups[:0] = halve(group, f"patching {len(group)} copies x {batch.n} prompts", spec.device)
            continue
        n = len(group)
        _count(passes, rows=n, equivalents=equivalents(share, starts, first_pos, n_layers, n_pos))
        values = metric_values(metrics, logits, target)  # each [copy * batch]
        for j, m in enumerate(metrics):
            patched = values[m].view(n, batch.n)  # [copy, batch]
            effects[group, j] = (patched - base[m].to(patched.device)).to(effects.device)
        bar.update(n)
    bar.close()
    return effects, {m: float(base[m].sum()) for m in metrics}


def _count(passes: dict, *, runs: int = 0, rows: int = 0, equivalents: float = 0.0) -> None:
    """Tally whole runs (one forward-equivalent each) and patched copies (``equivalents`` between them)."""
    passes["runs"] += runs
    passes["patched_rows"] += rows
    passes["forward_equivalents"] += runs + equivalents


def patcher(point, source: Tensor, entries: list[tuple[int, Component]], n_prompts: int, n_pos: int,
             first_pos: int = 0, alpha: float = 1.0):
    """Callback writing each entry's source value (or the receiver's moved alpha of the way to it) into its
    copy of the batch.

    source: [batch, pos, ...] normalised view of the source run at this hook point; the patched run
    holds positions ``first_pos`` on only (n_pos of them)."""
    def callback(raw: Tensor) -> Tensor:
        new = raw.clone()
        rows, n_p = batch_pos(new, n_pos)
        view = point.read(new, rows, n_p).unflatten(0, (rows // n_prompts, n_prompts))  # [copy, batch, pos, ..]
        for copy, c in entries:
            where = c.index()[1:]  # (pos, [unit])
            if c.pos is None:  # every position the pass computes: from first_pos on
                here, where = where, (slice(first_pos, first_pos + n_pos), *where[1:])
            else:
                here = (c.pos - first_pos, *where[1:])
            at, value = (copy, slice(None), *here), source[(slice(None), *where)].to(view.dtype)
            view[at] = value if alpha == 1 else view[at] + alpha * (value - view[at])
        return new
    return callback
