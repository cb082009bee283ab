"""One screen run end to end, as the CLI does it: task -> prompt batch -> screen -> files -> figures."""

from pathlib import Path

from torch import nn

from .engine import distributed
from .inputs.batch import make_batch
from .inputs.corruption import check_corruption, with_embedding_noise
from .inputs.pairs import load_jsonl
from .inputs.tasks import TASKS, builtin_task
from .output.checkpoint import Progress
from .output.provenance import manifest_dict
from .output.report import write_run
from .screening import ScreenConfig, config_dict, screen


def load_task(task: str, tokenizer=None, *, n_prompts: int = 16, seed: int = 0, vocab_size: int | None = None):
    """A built-in task name or a JSONL file -> list of PromptPair."""
    if task in TASKS:
        return builtin_task(task, tokenizer=tokenizer, n_pairs=n_prompts, seed=seed, vocab_size=vocab_size)
    path = Path(task)
    if not path.is_file():
        raise ValueError(f"--task {task!r} is neither a built-in task ({', '.join(TASKS)}) nor a file")
    return load_jsonl(path, tokenizer=tokenizer)


def one_length(pairs: list) -> list:
    """The pairs of the most common token length (ties: the shortest), so that positions align across
    prompts and per-position components mean the same token everywhere."""
    counts: dict[int, int] = {}
    for p in pairs:
        counts[len(p.clean_ids)] = counts.get(len(p.clean_ids), 0) + 1
    length = max(sorted(counts), key=lambda n: counts[n])
    return [p for p in pairs if len(p.clean_ids) == length]


def token_labels(pair, tokenizer) -> list[str]:
    """Labels for the position axis: the first clean prompt's tokens."""
    if tokenizer is None:
        return [str(i) for i in pair.clean_ids]
    return [tokenizer.decode([i]) for i in pair.clean_ids]


def run_screen(model: nn.Module, tokenizer, *, task: str, config: ScreenConfig, out: Path, model_name: str,
               n_prompts: int = 16, argv: list[str] | None = None, figures: bool = True,
               resume: bool = False, corruption: str = "str", noise_std: float = 3.0) -> dict:
    """Screen ``model`` on ``task`` and write every output into ``out``; returns the report dict.

    Each completed step is saved under ``out/.progress``; ``resume=True`` continues a killed run there
    (same model, prompts and options) and gives the same report as an uninterrupted run.
    corruption: ``str`` (symmetric token replacement, the task's corrupt prompts) or ``noise`` (Gaussian
    noise of ``noise_std`` x the embeddings' std on the clean prompt's key tokens: causal tracing)."""
    vocab = getattr(model.config, "vocab_size", None)
    aligned = task in TASKS and any(config.per_position(s) for s in config.sites)
    draw = 4 * n_prompts if aligned else n_prompts  # draw more, keep n_prompts of one token length
    pairs = load_task(task, tokenizer, n_prompts=draw, seed=config.seed, vocab_size=vocab)
    _check_ids(pairs, vocab)
    if aligned:
        pairs = one_length(pairs)[:n_prompts]
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    batch = make_batch(pairs, pad_id=pad or 0)
    check_corruption(corruption)
    if corruption == "noise":
        embedding = model.get_input_embeddings().weight.detach().cpu()
        batch = with_embedding_noise(batch, embedding, noise_std, seed=config.seed)
    manifest = manifest_dict(model_name=model_name, model=model, pairs=pairs, task=task,
                             options=config_dict(config), argv=argv)
    manifest["corruption"] = {"method": corruption, "noise_std": noise_std if corruption == "noise" else None}
    identity = {"weights": manifest["weights"], "prompts_sha256": manifest["prompts_sha256"],
                "options": {k: v for k, v in manifest["options"].items() if k != "progress"},
                "corruption": manifest["corruption"]}
    result = screen(model, batch, config, progress=Progress(Path(out), identity, resume=resume))
    if distributed.rank() != 0:  # rank 0 writes for everyone
        return {}
    report = write_run(Path(out), result, model_name=model_name, task=task,
                       tokens=token_labels(pairs[0], tokenizer), manifest=manifest)
    if figures:
        from .plot import draw_run
        draw_run(out)
    return report


def _check_ids(pairs, vocab: int | None) -> None:
    if vocab is None:
        return
    for i, p in enumerate(pairs):
        ids = [*p.clean_ids, *p.corrupt_ids, p.answer_id, p.wrong_id]
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise ValueError(f"pair {i}: token ids {bad} are out of the model's vocabulary (size {vocab})")


def run_edges(model: nn.Module, tokenizer, *, task: str, config, out: Path, model_name: str, n_prompts: int = 16,
              figures: bool = True) -> dict:
    """Edge screen of ``model`` on ``task`` (edge_screening.screen_edges), written into ``out``; returns the
    report dict. ``config``: an EdgeConfig."""
    from .edge_screening import screen_edges
    from .output.edge_report import write_edges

    pairs = load_task(task, tokenizer, n_prompts=n_prompts, seed=config.seed,
                      vocab_size=getattr(model.config, "vocab_size", None))
    _check_ids(pairs, getattr(model.config, "vocab_size", None))
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    result = screen_edges(model, make_batch(pairs, pad_id=pad or 0), config)
    report = write_edges(Path(out), result, model_name=model_name, task=task)
    if figures:
        from .plot.circuit import draw_edges
        draw_edges(out)
    return report
