"""Prompts for a run: a task (built in, or a JSONL file) -> the prompt pairs a screen runs on, and how they
were chosen (BOS rule, template, pairs skipped, dropped for another layout or unsolved); the corrupt run of
a corruption. The CLI and the pipeline both prepare prompts here, before any screen."""

from pathlib import Path

from torch import nn

from .analysis.baselines import solved
from .inputs.alignment import check_one_layout, keep_one_layout
from .inputs.batch import make_batch
from .inputs.corruption import check_corruption, prompts_of, with_embedding_noise
from .inputs.pairs import load_jsonl
from .inputs.tasks import TASKS, TEMPLATES, TaskDraw, draw_task
from .inputs.tokenization import added_bos, bos_id


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
        ok = solved(model, make_batch(pairs, pad_id=pad_token(tokenizer)), batch_size).tolist()
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


def pad_token(tokenizer) -> int:
    return (getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None) or 0


def _check_ids(pairs, vocab: int | None) -> None:
    if vocab is None:
        return
    for i, p in enumerate(pairs):
        ids = [*p.clean_ids, *p.corrupt_ids, p.answer_id, p.wrong_id]
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise ValueError(f"pair {i}: token ids {bad} are out of the model's vocabulary (size {vocab})")
