"""Progress of a long screen, written as it goes, so ``--resume`` continues after a kill.

Each completed step (attribution of one direction and estimator, exact patching of one site; for an edges run:
attribution, exact edge patching per direction, the faithfulness curve) is one safetensors file in ``OUT/.progress/``, written atomically; ``run.json`` there holds the run's identity
(model weights, prompts, options), and a resume with a different identity is refused. No pickle.

ATTRPATCH_KILL_AFTER_STEPS=N (fault injection for tests) SIGKILLs the process right after the N-th step
is saved.
"""

import json
import os
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..engine import distributed
from ..methods.edges.eap import EdgeScores
from ..methods.edges.patching import EdgeEffects
from ..methods.edges.position_top import PositionTop
from ..methods.estimators.attribution import Scores
from ..methods.patching.exact import Effects
from .files import write_atomic, write_json


def _differences(before: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, value then, value now) of every leaf that differs between two run identities."""
    out = []
    for k in sorted(set(before) | set(now)):
        a, b = before.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


class Progress:
    def __init__(self, folder: Path | None, identity: dict | None = None, resume: bool = False):
        self.folder = None if folder is None else Path(folder) / ".progress"
        self.saved = 0
        if self.folder is None:
            return
        marker = self.folder / "run.json"
        if resume and marker.exists():
            before = json.loads(marker.read_text())
            now = json.loads(json.dumps(identity or {}))
            if before != now:
                changed = ", ".join(f"{k}: {before_value!r} then, {now_value!r} now"
                                    for k, before_value, now_value in _differences(before, now))
                raise ValueError(f"--resume: the run in {self.folder.parent} was made with different {changed}; "
                                 "rerun with the same model, task and options, or drop --resume to start over")
        elif distributed.rank() == 0:
            if self.folder.exists():
                for f in self.folder.iterdir():
                    f.unlink()
            write_json(marker, identity)

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def _save(self, name: str, tensors: dict, meta: dict) -> None:
        if distributed.rank() != 0:  # every rank holds the reduced result; rank 0 writes it
            return
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"meta": json.dumps(meta)})
        write_atomic(self._path(name), lambda f: f.write(data), binary=True)
        self.saved += 1
        limit = os.environ.get("ATTRPATCH_KILL_AFTER_STEPS")
        if limit is not None and self.saved >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)

    def _load(self, name: str):
        if self.folder is None or not self._path(name).exists():
            return None
        from safetensors import safe_open
        with safe_open(str(self._path(name)), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        return load_file(str(self._path(name))), meta

    def scores(self, name: str, device) -> tuple[Scores, dict] | None:
        """The saved mean scores, and the per-prompt scores {metric: {site: [component, batch]}}."""
        found = self._load(name)
        if found is None:
            return None
        tensors, meta = found
        values: dict = {}
        prompts: dict = {}
        for key, t in tensors.items():
            parts = key.split("/")
            if parts[0] == "prompt":
                prompts.setdefault(parts[1], {})[parts[2]] = t
            else:
                values.setdefault(parts[0], {})[parts[1]] = t.to(device)
        return Scores(values=values, **meta), prompts

    def save_scores(self, name: str, scores: Scores, prompts: dict) -> None:
        if self.folder is None:
            return
        tensors = {f"{m}/{s}": t for m, per in scores.values.items() for s, t in per.items()}
        tensors.update({f"prompt/{m}/{s}": t for m, per in prompts.items() for s, t in per.items()})
        meta = {k: getattr(scores, k) for k in ("direction", "clean_metric", "corrupt_metric", "n_prompts",
                                                 "per_prompt", "passes", "estimator")}
        self._save(name, tensors, meta)

    def effects(self, name: str, components: list) -> Effects | None:
        found = self._effects(name, components)
        return None if found is None else Effects(components=components, **found)

    def edge_effects(self, name: str, items: list) -> EdgeEffects | None:
        """The saved exact effects of edge ``items`` (Edges, or tuples patched jointly), or None."""
        found = self._effects(name, items)
        return None if found is None else EdgeEffects(items=items, **found)

    def _effects(self, name: str, items: list) -> dict | None:
        """A saved patch step's fields, None when not saved or saved for other ``items``."""
        found = self._load(name)
        if found is None:
            return None
        tensors, meta = found
        if meta.pop("names") != [str(c) for c in items]:
            return None  # a different plan: recompute
        return {"values": tensors["values"], "per_prompt": tensors.get("per_prompt"), **meta}

    def save_effects(self, name: str, effects: Effects | EdgeEffects) -> None:
        """Exact effects of components (Effects) or of edges (EdgeEffects)."""
        if self.folder is None:
            return
        items = effects.components if isinstance(effects, Effects) else effects.items
        meta = {"metrics": effects.metrics, "direction": effects.direction, "receiver_metric": effects.receiver_metric,
                "passes": effects.passes, "names": [str(c) for c in items]}
        tensors = {"values": effects.values}
        if effects.per_prompt is not None:
            tensors["per_prompt"] = effects.per_prompt
        self._save(name, tensors, meta)

    def edge_scores(self, name: str, graph) -> EdgeScores | None:
        """The saved edge scores of ``graph`` (methods/edges/graph.py), or None."""
        found = self._load(name)
        if found is None:
            return None
        tensors = found[0]
        values = {k: v for k, v in tensors.items() if "/" not in k}
        by_position = {k[4:]: v for k, v in tensors.items() if k.startswith("pos/")} or None
        top = None
        if "top/index" in tensors:  # only the per-position top-K was kept
            top = PositionTop(index=tensors["top/index"], value={m: tensors[f"top/{m}"] for m in values},
                              pool=tensors["pool/index"], pool_value={m: tensors[f"pool/{m}"] for m in values},
                              n_pos=int(tensors["top/n_pos"]))
        return EdgeScores(graph=graph, values=values, by_position=by_position, position_top=top, **found[1])

    def save_edge_scores(self, name: str, scores: EdgeScores) -> None:
        if self.folder is None:
            return
        meta = {k: getattr(scores, k) for k in ("direction", "clean_metric", "corrupt_metric", "n_prompts",
                                                 "estimator", "passes")}
        positions = {f"pos/{m}": t for m, t in (scores.by_position or {}).items()}  # per-position edges
        top = scores.position_top
        if top is not None:  # or their top-K and pool (methods/edges/position_top.py)
            positions = {"top/index": top.index, "pool/index": top.pool, "top/n_pos": torch.tensor(top.n_pos),
                         **{f"top/{m}": v for m, v in top.value.items()},
                         **{f"pool/{m}": v for m, v in top.pool_value.items()}}
        self._save(name, {**scores.values, **positions}, meta)

    def record(self, name: str) -> dict | None:
        """A saved step whose result is plain JSON (an edges run's faithfulness curve), or None."""
        found = self._load(name)
        return None if found is None else found[1]

    def save_record(self, name: str, record: dict) -> None:
        if self.folder is not None:
            self._save(name, {}, record)
