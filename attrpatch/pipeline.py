"""One run end to end, as the CLI does it: task -> prompt batch (prompts.py) -> screen -> files -> figures."""

from pathlib import Path

from torch import nn

from .analysis.sanity import by_group
from .config import EdgeConfig, ScreenConfig, config_dict, with_primary_metric
from .engine import distributed
from .feature_screening import check_dictionaries, run_features
from .inputs.alignment import position_labels
from .inputs.batch import make_batch
from .inputs.corruption import check_corruption, prompts_of
from .methods.ablation import label as ablation_label
from .output.checkpoint import Progress
from .output.provenance import manifest_dict
from .output.report import write_run
from .prompts import corrupted, pad_token, prepare_pairs
from .screening import screen


def run_windows(model: nn.Module, tokenizer, *, task: str, out: Path, site: str = "mlp_out",
                widths: tuple[int, ...] = (1,), position: str | None = None, corruptions: tuple[str, ...] = ("str",),
                metrics: tuple[str, ...] = ("logit_diff",), direction: str = "denoise", n_prompts: int = 16,
                seed: int = 0, noise_std: float = 3.0, prepend_bos: str = "auto", template: int | str | None = None,
                keep_correct: bool = False, batch_size: int | None = None, figures: bool = True,
                model_name: str | None = None) -> dict:
    """Sliding windows (methods/patching/windows.py) of ``site`` at one position, per corruption: out/windows.json
    ({corruption: sweep}, each sweep naming the model and task for the figure's title) and
    out/figures/windows.png. position: a role (S2, subject, ...) or an index; default: the task's key role
    (output/corruptions.KEY_ROLES)."""
    from .methods.patching.windows import sweep_windows
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
    batches = {p: make_batch(found, pad_id=pad_token(tokenizer)) for p, found in drawn.items()}
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


def run_screen(model: nn.Module, tokenizer, *, task: str, config: ScreenConfig, out: Path, model_name: str,
               n_prompts: int = 16, argv: list[str] | None = None, figures: bool = True,
               resume: bool = False, corruption: str = "str", noise_std: float = 3.0, prepend_bos: str = "auto",
               template: int | str | None = None, keep_correct: bool = False,
               formats: tuple[str, ...] = ("png",), dictionaries: tuple = ()) -> dict:
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
    formats: the figures' file formats (png, pdf, svg; each one a full render, so png alone by default).
    dictionaries: sparse dictionaries (model/dictionaries.py) whose latents are screened too, after the sites
    (feature_screening.py): features.json, features.csv, report.md's "Features", figures/features_*.png."""
    config = with_primary_metric(config)
    labels = tuple(dict.fromkeys(c.strip() for c in corruption.split(",") if c.strip()))
    check_dictionaries(model, dictionaries, config, labels)
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
                                   per_position=any(config.per_position(s) for s in config.sites) or bool(dictionaries),
                                   prepend_bos=prepend_bos, template=template, keep_correct=keep_correct,
                                   batch_size=config.batch_size, corruption=corruption)
    batch = corrupted(model, make_batch(pairs, pad_id=pad_token(tokenizer)), corruption, noise_std, config.seed)
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
    if dictionaries:
        report["features"] = run_features(model, batch, dictionaries, config, out, figures=figures, formats=formats,
                                          tokens=position_labels(pairs, tokenizer), model_name=model_name, task=task)
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


def run_edges(model: nn.Module, tokenizer, *, task: str, config: EdgeConfig, out: Path, model_name: str, n_prompts: int = 16,
              figures: bool = True, prepend_bos: str = "auto", template: int | str | None = None,
              keep_correct: bool = False) -> dict:
    """Edge screen of ``model`` on ``task`` (edge_screening.screen_edges), written into ``out``; returns the
    report dict. Edges are summed over positions, so prompts of several
    templates mix; prepend_bos, template, keep_correct as for :func:`prepare_pairs`."""
    from .edge_screening import screen_edges
    from .output.edge_report import write_edges

    config = with_primary_metric(config)
    pairs, prompts = prepare_pairs(model, tokenizer, task=task, n_prompts=n_prompts, seed=config.seed,
                                   prepend_bos=prepend_bos, template=template, keep_correct=keep_correct,
                                   batch_size=config.batch_size)
    result = screen_edges(model, make_batch(pairs, pad_id=pad_token(tokenizer)), config)
    result.sanity["per_template"] = by_group(result.sanity["per_pair"], [p.template for p in pairs])
    result.sanity["prompt_selection"] = prompts
    report = write_edges(Path(out), result, model_name=model_name, task=task, prompt_selection=prompts)
    if figures:
        from .plot.circuit import draw_edges
        draw_edges(out)
    return report
