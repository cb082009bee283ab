"""One screen run end to end, as the CLI does it: task -> prompt batch -> screen -> files -> figures."""

from pathlib import Path

from torch import nn

from .analysis.baselines import solved
from .analysis.sanity import by_group
from .engine import distributed
from .inputs.alignment import check_one_layout, keep_one_layout, position_labels
from .inputs.batch import make_batch
from .methods.ablation import label as ablation_label
from .inputs.corruption import check_corruption, prompts_of, with_embedding_noise
from .inputs.pairs import load_jsonl
from .inputs.tasks import TASKS, TEMPLATES, TaskDraw, draw_task
from .inputs.tokenization import added_bos, bos_id
from .output.checkpoint import Progress
from .output.provenance import manifest_dict
from .output.report import write_run
from .screening import ScreenConfig, config_dict, screen


def check_task(task: str) -> None:
    """Refuse a task that is neither built in nor a file, before a model is loaded."""
    if task not in TASKS and not Path(task).is_file():
        raise ValueError(f"--task {task!r} is neither a built-in task ({', '.join(TASKS)}) nor a file")


def load_task(task: str, tokenizer=None, *, n_prompts: int = 16, seed: int = 0, vocab_size: int | None = None,
              bos: int | None = None, template: int | str | None = None, corruption: str = "str") -> TaskDraw:
    """A built-in task name or a JSONL file -> the pairs (and for built-in tasks, what was skipped).
    template: a built-in task's template index, or a JSONL file's "template" label, to keep alone.
    corruption: the pairs' corrupt prompts are that corruption's (inputs/corruption.prompts_of)."""
    check_corruption(corruption, task)
    if task in TASKS:
        if template is not None and not str(template).isdigit():
            raise ValueError(f"--template {template!r}: built-in task {task!r} takes a template index; "
                             f"its templates are: " + "; ".join(f"{i}: {t}" for i, t in enumerate(TEMPLATES[task])))
        return draw_task(task, tokenizer, n_prompts, seed, vocab_size, bos=bos,
                         template=None if template is None else int(template), corruption=prompts_of(corruption))
    check_task(task)
    path = Path(task)
    pairs = load_jsonl(path, tokenizer=tokenizer, bos=bos)
    if template is not None:
        labels = sorted({str(p.template) for p in pairs})
        pairs = [p for p in pairs if p.template == str(template)]
        if not pairs:
            raise ValueError(f"--template {template!r}: no pair of {path} has that \"template\" label; "
                             f"labels there: {', '.join(labels)}")
    return TaskDraw(pairs)


def prepare_pairs(model: nn.Module, tokenizer, *, task: str, n_prompts: int, seed: int = 0,
                  per_position: bool = False, prepend_bos: str = "auto", template: int | str | None = None,
                  keep_correct: bool = False, batch_size: int | None = None, corruption: str = "str") -> tuple[list, dict]:
    """The prompt pairs a screen runs on, and a record of how they were chosen (for the manifest and the
    report): the BOS rule, the template, pairs skipped, dropped for another layout or unsolved.
    per_position: some site is scored per position, so every pair must share one layout. corruption: whose
    corrupt prompts the pairs carry (``abc``: IOI's third name at S2; the others: the task's own)."""
    bos = bos_id(tokenizer, prepend_bos)
    builtin = task in TASKS
    if builtin and per_position and template is None and len(TEMPLATES[task]) > 1:
        template = 0  # one template, so that positions align
    draw = load_task(task, tokenizer, n_prompts=(4 if builtin and (per_position or keep_correct) else 1) * n_prompts,
                     seed=seed, vocab_size=getattr(model.config, "vocab_size", None), bos=bos,
                     template=template, corruption=corruption)
    pairs = draw.pairs
    _check_ids(pairs, getattr(model.config, "vocab_size", None))
    record = {"prepend_bos": prepend_bos, "bos_id": bos,
              "bos_token": None if bos is None or tokenizer is None else tokenizer.convert_ids_to_tokens(bos),
              "tokenizer_adds_bos": None if tokenizer is None else added_bos(tokenizer) is not None,
              "template": template if not builtin or template is None else TEMPLATES[task][int(template)],
              "skipped": draw.skipped_words(), "dropped_other_layout": 0, "dropped_unsolved": 0}
    if keep_correct:
        ok = solved(model, make_batch(pairs, pad_id=_pad(tokenizer)), batch_size).tolist()
        record["dropped_unsolved"] = ok.count(False)
        pairs = [p for p, good in zip(pairs, ok) if good]
        if not pairs:
            raise ValueError("--keep-correct: the model solves none of the pairs (answer above the wrong token on "
                             "the clean prompt); check the answers, --prepend-bos, or choose another task")
    if per_position:
        if builtin:
            pairs, record["dropped_other_layout"] = keep_one_layout(pairs)
        check_one_layout(pairs[:n_prompts])
    return pairs[:n_prompts], record


def corrupted(model: nn.Module, batch, corruption: str, noise_std: float = 3.0, seed: int = 0):
    """``batch`` with the corrupt run of ``corruption``: str and abc (the pairs' corrupt prompts, as they are:
    prepare_pairs drew them) or noise (Gaussian noise of ``noise_std`` x the embeddings' std on the clean
    prompt's key tokens)."""
    check_corruption(corruption)
    if corruption != "noise":
        return batch
    return with_embedding_noise(batch, model.get_input_embeddings().weight.detach().cpu(), noise_std, seed=seed)


def run_windows(model: nn.Module, tokenizer, *, task: str, out: Path, site: str = "mlp_out",
                widths: tuple[int, ...] = (1,), position: str | None = None, corruptions: tuple[str, ...] = ("str",),
                metrics: tuple[str, ...] = ("logit_diff",), direction: str = "denoise", n_prompts: int = 16,
                seed: int = 0, noise_std: float = 3.0, prepend_bos: str = "auto", template: int | str | None = None,
                keep_correct: bool = False, batch_size: int | None = None, figures: bool = True,
                model_name: str | None = None) -> dict:
    """Sliding windows (methods/windows.py) of ``site`` at one position, per corruption: out/windows.json
    ({corruption: sweep}, each sweep naming the model and task for the figure's title) and
    out/figures/windows.png. position: a role (S2, subject, ...) or an index; default: the task's key role
    (output/corruptions.KEY_ROLES)."""
    from .methods.windows import sweep_windows
    from .output.corruptions import KEY_ROLES
    from .output.files import write_json

    for c in corruptions:
        check_corruption(c, task)
    drawn = {p: prepare_pairs(model, tokenizer, task=task, n_prompts=n_prompts, seed=seed, per_position=True,
                              prepend_bos=prepend_bos, template=template, keep_correct=keep_correct,
                              batch_size=batch_size, corruption=p)[0]
             for p in dict.fromkeys(prompts_of(c) for c in corruptions)}
    pairs = next(iter(drawn.values()))
    roles = pairs[0].role_positions
    name = position or next((r for r in KEY_ROLES if r in roles), None)
    if name is None or not (str(name).isdigit() or name in roles):
        raise ValueError(f"position {name!r} is neither a token index nor a role of these prompts (roles: "
                         f"{', '.join(roles) or 'none'}); pass --position with one of them or an index")
    pos = int(name) if str(name).isdigit() else roles[name]
    batches = {p: make_batch(found, pad_id=_pad(tokenizer)) for p, found in drawn.items()}
    sweeps = {c: sweep_windows(model, corrupted(model, batches[prompts_of(c)], c, noise_std, seed), site=site,
                               widths=widths, pos=pos,
                               metrics=metrics, direction=direction, batch_size=batch_size).to_dict()
              | {"pos_label": None if str(name).isdigit() else name, "task": task,
                 "model": model_name or getattr(model.config, "_name_or_path", None)} for c in corruptions}
    write_json(Path(out) / "windows.json", sweeps)
    if figures:
        from .plot.style import save
        from .plot.windows import plot_windows
        save(plot_windows(sweeps), Path(out) / "figures" / "windows")
    return sweeps


def _pad(tokenizer) -> int:
    return (getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None) or 0


def run_screen(model: nn.Module, tokenizer, *, task: str, config: ScreenConfig, out: Path, model_name: str,
               n_prompts: int = 16, argv: list[str] | None = None, figures: bool = True,
               resume: bool = False, corruption: str = "str", noise_std: float = 3.0, prepend_bos: str = "auto",
               template: int | str | None = None, keep_correct: bool = False,
               formats: tuple[str, ...] = ("png",)) -> dict:
    """Screen ``model`` on ``task`` and write every output into ``out``; returns the report dict.

    Each completed step is saved under ``out/.progress``; ``resume=True`` continues a killed run there
    (same model, prompts and options) and gives the same report as an uninterrupted run.
    corruption: ``str`` (symmetric token replacement, the task's corrupt prompts) or ``noise`` (Gaussian
    noise of ``noise_std`` x the embeddings' std on the clean prompt's key tokens: causal tracing); several,
    comma-separated ("str,noise"): one whole run per corruption in ``out/<corruption>/``, each the same as
    that corruption's run alone, and their comparison in ``out`` (:func:`run_corruptions`).
    ``config.ablation`` (zero | mean | resample) measures every component against that ablation of the clean
    run instead (methods/ablation.py); the one corruption then only sets the unit of normalised effects.
    prepend_bos, template, keep_correct: how prompts are chosen and encoded (:func:`prepare_pairs`).
    formats: the figures' file formats (png, pdf, svg; each one a full render, so png alone by default)."""
    labels = tuple(dict.fromkeys(c.strip() for c in corruption.split(",") if c.strip()))
    for label in labels or (corruption,):
        check_corruption(label, task)
    if config.ablation is not None:
        _check_ablation_run(config.ablation, labels)
    if len(labels) > 1:
        options = dict(task=task, config=config, model_name=model_name, n_prompts=n_prompts, argv=argv,
                       figures=figures, resume=resume, noise_std=noise_std, prepend_bos=prepend_bos,
                       template=template, keep_correct=keep_correct, formats=formats)
        return run_corruptions(model, tokenizer, labels, out=Path(out), **options)
    pairs, prompts = prepare_pairs(model, tokenizer, task=task, n_prompts=n_prompts, seed=config.seed,
                                   per_position=any(config.per_position(s) for s in config.sites),
                                   prepend_bos=prepend_bos, template=template, keep_correct=keep_correct,
                                   batch_size=config.batch_size, corruption=corruption)
    batch = corrupted(model, make_batch(pairs, pad_id=_pad(tokenizer)), corruption, noise_std, config.seed)
    manifest = manifest_dict(model_name=model_name, model=model, pairs=pairs, task=task,
                             options=config_dict(config), argv=argv)
    manifest["corruption"] = {"method": corruption, "noise_std": noise_std if corruption == "noise" else None}
    if config.ablation is not None:  # labelled as the ablation; the corruption is the unit of scale only
        manifest["corruption"] = {"method": ablation_label(config.ablation), "ablation": config.ablation,
                                  "scale": manifest["corruption"]}
    manifest["prompt_selection"] = prompts
    identity = {"weights": manifest["weights"], "prompts_sha256": manifest["prompts_sha256"],
                "options": {k: v for k, v in manifest["options"].items() if k != "progress"},
                "corruption": manifest["corruption"], "prompt_selection": prompts}
    result = screen(model, batch, config, progress=Progress(Path(out), identity, resume=resume))
    if distributed.rank() != 0:  # rank 0 writes for everyone
        return {}
    result.sanity["per_template"] = by_group(result.sanity["per_pair"], [p.template for p in pairs])
    result.sanity["prompt_selection"] = prompts
    report = write_run(Path(out), result, model_name=model_name, task=task,
                       tokens=position_labels(pairs, tokenizer), manifest=manifest)
    if figures:
        from .plot import draw_run
        draw_run(out, formats)
    return report


def _check_ablation_run(ablation: str, corruptions: tuple[str, ...]) -> None:
    """An ablation replaces the corrupt run: one corruption (its gap the unit of scale), and mean or resample
    over all the prompts, so in one process."""
    if len(corruptions) > 1:
        raise ValueError(f"--ablation {ablation} measures every component against the {ablation} ablation, not "
                         f"a corrupted prompt; it takes one --corruption (its clean - corrupt gap is the unit of the "
                         f"normalised effects), got {', '.join(corruptions)}")
    if ablation != "zero" and distributed.active():
        raise ValueError(f"--ablation {ablation} takes values across all the prompts; run it in one process "
                         "(the prompts are split between processes here)")


def run_corruptions(model: nn.Module, tokenizer, corruptions: tuple[str, ...], *, out: Path, figures: bool = True,
                    formats: tuple[str, ...] = ("png",), **options) -> dict:
    """One :func:`run_screen` per corruption into ``out/<corruption>/``, then their comparison in ``out``:
    corruptions.json, corruptions.md (the ``corruptions_disagree`` flags) and figures/corruptions_*.png.
    Returns {"corruptions": the comparison, "runs": {corruption: report}}."""
    from .output.corruptions import write_corruptions

    reports = {c: run_screen(model, tokenizer, out=out / c, corruption=c, figures=figures, formats=formats, **options)
               for c in corruptions}
    if distributed.rank() != 0:
        return {}
    comp = write_corruptions(out, reports)
    if figures:
        from .plot.corruptions import plot_corruptions
        from .plot.style import save
        for direction in dict.fromkeys(e["direction"] for e in comp["components"]):
            try:
                save(plot_corruptions(comp, direction), out / "figures" / f"corruptions_{direction}", formats)
            except ValueError:  # nothing verified at the key position under two corruptions: no figure
                pass
    return {"corruptions": comp, "runs": reports}


def _check_ids(pairs, vocab: int | None) -> None:
    if vocab is None:
        return
    for i, p in enumerate(pairs):
        ids = [*p.clean_ids, *p.corrupt_ids, p.answer_id, p.wrong_id]
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise ValueError(f"pair {i}: token ids {bad} are out of the model's vocabulary (size {vocab})")


def run_edges(model: nn.Module, tokenizer, *, task: str, config, out: Path, model_name: str, n_prompts: int = 16,
              figures: bool = True, prepend_bos: str = "auto", template: int | str | None = None,
              keep_correct: bool = False) -> dict:
    """Edge screen of ``model`` on ``task`` (edge_screening.screen_edges), written into ``out``; returns the
    report dict. ``config``: an EdgeConfig. Edges are summed over positions, so prompts of several
    templates mix; prepend_bos, template, keep_correct as for :func:`prepare_pairs`."""
    from .edge_screening import screen_edges
    from .output.edge_report import write_edges

    pairs, prompts = prepare_pairs(model, tokenizer, task=task, n_prompts=n_prompts, seed=config.seed,
                                   prepend_bos=prepend_bos, template=template, keep_correct=keep_correct,
                                   batch_size=config.batch_size)
    result = screen_edges(model, make_batch(pairs, pad_id=_pad(tokenizer)), config)
    result.sanity["per_template"] = by_group(result.sanity["per_pair"], [p.template for p in pairs])
    result.sanity["prompt_selection"] = prompts
    report = write_edges(Path(out), result, model_name=model_name, task=task, prompt_selection=prompts)
    if figures:
        from .plot.circuit import draw_edges
        draw_edges(out)
    return report
