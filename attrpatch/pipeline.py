"""One run end to end, as the CLI does it: task -> prompt batch (prompts.py) -> screen -> files -> figures."""

from dataclasses import replace
from pathlib import Path

from torch import nn

from .analysis.results import EdgeResult, ScreenResult
from .analysis.sanity import by_group
from .config import EdgeConfig, PromptOptions, ScreenConfig, config_dict, prompt_options, with_primary_metric
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
                widths: tuple[int, ...] = (1,), position: str | None = None, metrics: tuple[str, ...] = ("logit_diff",),
                direction: str = "denoise", seed: int = 0, batch_size: int | None = None,
                prompts: PromptOptions | None = None, figures: bool = True, model_name: str | None = None,
                **prompt_keywords) -> dict:
    """Sliding windows (methods/patching/windows.py) of ``site`` at one position, per corruption of ``prompts``
    (config.PromptOptions, or its fields as keywords): out/windows.json ({corruption: sweep}, each sweep naming
    the model and task for the figure's title) and out/figures/windows.png. position: a role (S2, subject, ...)
    or an index; default: the task's key role (output/corruptions.KEY_ROLES)."""
    from .methods.patching.windows import sweep_windows
    from .output.corruptions import KEY_ROLES
    from .output.files import write_json

    prompts = prompt_options(prompts, prompt_keywords, "run_windows")
    corruptions = prompts.corruption
    for c in corruptions:
        check_corruption(c, task)
    drawn = {p: _draw(model, tokenizer, task, prompts, seed=seed, batch_size=batch_size, per_position=True,
                      corruption=p)[0]
             for p in dict.fromkeys(prompts_of(c) for c in corruptions)}
    pairs = next(iter(drawn.values()))
    roles = pairs[0].role_positions
    name = position or next((r for r in KEY_ROLES if r in roles), None)
    if name is None or not (str(name).isdigit() or name in roles):
        raise ValueError(f"position {name!r} is neither a token index nor a role of these prompts (roles: "
                         f"{', '.join(roles) or 'none'}); pass --position with one of them or an index")
    pos = int(name) if str(name).isdigit() else roles[name]
    batches = {p: make_batch(found, pad_id=pad_token(tokenizer)) for p, found in drawn.items()}
    sweeps = {c: sweep_windows(model, corrupted(model, batches[prompts_of(c)], c, prompts.noise_std, seed), site=site,
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
               prompts: PromptOptions | None = None, argv: list[str] | None = None, figures: bool = True,
               resume: bool = False, formats: tuple[str, ...] = ("png",), dictionaries: tuple = (),
               **prompt_keywords) -> dict:
    """Screen ``model`` on ``task`` and write every output into ``out``; returns the report dict.

    Each completed step is saved under ``out/.progress``; ``resume=True`` continues a killed run there
    (same model, prompts and options) and gives the same report as an uninterrupted run.
    prompts: how prompts are chosen and encoded and their corruption (config.PromptOptions); or its fields as
    keywords (``n_prompts=8, corruption="str,noise"``), as before the options had a type.
    Its corruption: ``str`` (symmetric token replacement, the task's corrupt prompts) or ``noise`` (Gaussian
    noise of ``noise_std`` x the embeddings' std on the clean prompt's key tokens: causal tracing); several
    (("str", "noise")): one whole run per corruption in ``out/<corruption>/``, each the same as that
    corruption's run alone, and their comparison in ``out`` (:func:`run_corruptions`).
    ``config.ablation`` (zero | mean | resample) measures every component against that ablation of the clean
    run instead (methods/ablation.py); the one corruption then only sets the unit of normalised effects.
    formats: the figures' file formats (png, pdf, svg; each one a full render, so png alone by default).
    dictionaries: sparse dictionaries (model/dictionaries.py) whose latents are screened too, after the sites
    (feature_screening.py): features.json, features.csv, report.md's "Features", figures/features_*.png."""
    config, prompts = with_primary_metric(config), prompt_options(prompts, prompt_keywords, "run_screen")
    check_dictionaries(model, dictionaries, config, prompts.corruption)
    for label in prompts.corruption:
        check_corruption(label, task)
    if config.ablation is not None:
        _check_ablation_run(config.ablation, prompts.corruption)
    if len(prompts.corruption) > 1:
        return run_corruptions(model, tokenizer, out=Path(out), prompts=prompts, task=task, config=config,
                               model_name=model_name, argv=argv, figures=figures, resume=resume, formats=formats)
    corruption = prompts.corruption[0]
    pairs, selection = _draw(model, tokenizer, task, prompts, seed=config.seed, batch_size=config.batch_size,
                             per_position=any(config.per_position(s) for s in config.sites) or bool(dictionaries),
                             corruption=corruption)
    batch = corrupted(model, make_batch(pairs, pad_id=pad_token(tokenizer)), corruption, prompts.noise_std,
                      config.seed)
    manifest = manifest_dict(model_name=model_name, model=model, pairs=pairs, task=task,
                             options=config_dict(config), argv=argv)
    manifest["corruption"] = {"method": corruption, "noise_std": prompts.noise_std if corruption == "noise" else None}
    if config.ablation is not None:  # labelled as the ablation; the corruption is the unit of scale only
        manifest["corruption"] = {"method": ablation_label(config.ablation), "ablation": config.ablation,
                                  "scale": manifest["corruption"]}
    manifest["prompt_selection"] = selection
    identity = {"weights": manifest["weights"], "prompts_sha256": manifest["prompts_sha256"],
                "options": {k: v for k, v in manifest["options"].items() if k not in ("progress", "processes")},
                "corruption": manifest["corruption"], "prompt_selection": selection}
    result: ScreenResult = screen(model, batch, config, progress=Progress(Path(out), identity, resume=resume))
    if distributed.rank() != 0:  # rank 0 writes for everyone
        return {}
    result.sanity["per_template"] = by_group(result.sanity["per_pair"], [p.template for p in pairs])
    result.sanity["prompt_selection"] = selection
    report = write_run(Path(out), result, model_name=model_name, task=task,
                       tokens=position_labels(pairs, tokenizer), manifest=manifest)
    if figures:
        from .plot import draw_run
        draw_run(out, formats)
    if dictionaries:
        report["features"] = run_features(model, batch, dictionaries, config, out, figures=figures, formats=formats,
                                          tokens=position_labels(pairs, tokenizer), model_name=model_name, task=task)
    return report


def _draw(model: nn.Module, tokenizer, task: str, prompts: PromptOptions, *, seed: int, batch_size: int | None,
          per_position: bool = False, corruption: str = "str") -> tuple[list, dict]:
    """prompts.prepare_pairs with ``prompts``' choice and encoding; ``corruption``: one of its corruptions."""
    return prepare_pairs(model, tokenizer, task=task, n_prompts=prompts.n_prompts, seed=seed,
                         per_position=per_position, prepend_bos=prompts.prepend_bos, template=prompts.template,
                         keep_correct=prompts.keep_correct, batch_size=batch_size, corruption=corruption)


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


def run_corruptions(model: nn.Module, tokenizer, *, out: Path, prompts: PromptOptions, figures: bool = True,
                    formats: tuple[str, ...] = ("png",), **options) -> dict:
    """One :func:`run_screen` per corruption of ``prompts`` into ``out/<corruption>/``, then their comparison in
    ``out``: corruptions.json, corruptions.md (the ``corruptions_disagree`` flags) and
    figures/corruptions_*.png. Returns {"corruptions": the comparison, "runs": {corruption: report}}."""
    from .output.corruptions import write_corruptions

    reports = {c: run_screen(model, tokenizer, out=out / c, prompts=replace(prompts, corruption=(c,)),
                             figures=figures, formats=formats, **options)
               for c in prompts.corruption}
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


def run_edges(model: nn.Module, tokenizer, *, task: str, config: EdgeConfig, out: Path, model_name: str,
              prompts: PromptOptions | None = None, figures: bool = True, resume: bool = False,
              mib: Path | None = None, **prompt_keywords) -> dict:
    """Edge screen of ``model`` on ``task`` (edge_screening.screen_edges), written into ``out``; returns the
    report dict. Edges are summed over positions, so prompts of several templates mix; per-position edges
    (``config.positions == "each"``) take aligned prompts, as a per-position screen does. prompts: as for
    :func:`run_screen` (or its fields as keywords), its corruption str alone. Each completed step is saved
    under ``out/.progress``; ``resume=True`` continues a killed run there, as :func:`run_screen` does. ``mib``:
    write MIB's edge-score JSON there (sets ``config.mib``, which scores the run as MIB does; per-position runs are
    scored but write no JSON: MIB's graphs are whole edges)."""
    from .edge_screening import screen_edges
    from .output.edge_report import write_edges

    config = with_primary_metric(replace(config, mib=True) if mib is not None else config)
    prompts = prompt_options(prompts, prompt_keywords, "run_edges")
    if prompts.corruption != ("str",):
        raise ValueError(f"the edge screen runs on the task's own corrupt prompts (corruption str), got corruption "
                         f"{', '.join(prompts.corruption)}; leave corruption at ('str',), or screen components "
                         "(run_screen, attrpatch screen --corruption) for the others")
    pairs, selection = _draw(model, tokenizer, task, prompts, seed=config.seed, batch_size=config.batch_size,
                             per_position=config.positions == "each")
    manifest = manifest_dict(model_name=model_name, model=model, pairs=pairs, task=task, options=config_dict(config))
    identity = {"kind": "edges", "weights": manifest["weights"], "prompts_sha256": manifest["prompts_sha256"],
                "options": manifest["options"], "prompt_selection": selection}
    result: EdgeResult = screen_edges(model, make_batch(pairs, pad_id=pad_token(tokenizer)), config,
                                      progress=Progress(Path(out), identity, resume=resume))
    result.sanity["per_template"] = by_group(result.sanity["per_pair"], [p.template for p in pairs])
    result.sanity["prompt_selection"] = selection
    report = write_edges(Path(out), result, model_name=model_name, task=task, prompt_selection=selection,
                         tokens=position_labels(pairs, tokenizer) if config.positions == "each" else None)
    if mib is not None and result.mib_export is not None:  # per-position runs: scores only (edge_mib.py)
        from .output.mib import write_export
        write_export(Path(mib), result.mib_export)
    if figures:
        from .plot.circuit import draw_edges
        draw_edges(out)
    return report
