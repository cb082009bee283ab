"""Train the toy GPT-2 shipped in attrpatch/data/toy-gpt2 on the built-in tasks.

A 4-layer GPT-2 with a word-level tokenizer, trained from scratch on a mixture of the three
tasks of attrpatch.tasks (ioi, facts, induction), both clean and corrupt prompts with their
answers, so that it has real circuits to find. Deterministic given --seed and --threads.

Examples:
    python scripts/train_toy_model.py                      # writes attrpatch/data/toy-gpt2
    python scripts/train_toy_model.py --out /tmp/toy --steps 500 --threads 2

At the end it prints each task's held-out accuracy (argmax == answer on the "test" split, clean
and corrupt prompts) and exits with status 1, saving nothing, if any is below --min-accuracy.
"""

import argparse
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attrpatch.inputs import tasks  # noqa: E402
from attrpatch.inputs.pairs import tokenize_pair  # noqa: E402
from attrpatch.model.hf_compat import portable_tokenizer  # noqa: E402

EOS, PAD, UNK = "<|endoftext|>", "<pad>", "<unk>"
# GPT-2-like pre-tokenisation: a word with its leading space, one punctuation mark, whitespace.
SPLIT_PATTERN = r" ?[A-Za-z0-9']+| ?[^\sA-Za-z0-9]|\s+"
PUNCTUATION = list(",.!?:;'\"()-")
# Pairs per batch cycle through TASK_MIX; induction gets more since its circuit forms slowest.
TASK_MIX = ("ioi", "induction", "facts", "induction")
MIN_REPEAT, MAX_REPEAT = 4, 14  # length of the random sequence R in induction training
MAX_FILL = 10  # most random tokens before R and between R and its repeat
# Extra word tokens: more material for the induction task (random repeated sequences).
FILLER_WORDS = """
apple river stone cloud window garden yellow silver market forest candle button pencil mirror
rabbit tiger lemon orange purple castle bridge island desert valley ocean planet rocket engine
wheel ladder basket blanket carpet pillow kettle spoon plate bottle jacket boots glove hat
scarf shirt violin drum piano guitar trumpet flute poem story novel paper ink chalk marble
copper iron gold velvet cotton wool leather honey bread cheese butter salt pepper sugar
coffee tea milk juice water fire wind snow rain storm thunder summer winter autumn spring
morning evening night moon star comet meteor dragon wizard knight king queen prince farmer
sailor pilot doctor teacher baker painter singer dancer hunter robot camera laptop phone
radio clock compass anchor arrow shield sword helmet lantern torch tunnel tower temple
village harbor canyon glacier meadow orchard vineyard cottage barn fence gate path road
street corner shadow light sound silence dream memory secret puzzle riddle answer question
""".split()


def _words() -> list[str]:
    """Every word the tasks use, plus the fillers, sorted."""
    texts = [*tasks.IOI_TEMPLATES, *tasks.IOI_NAMES, *tasks.IOI_PLACES, *tasks.IOI_OBJECTS,
             *tasks.FACT_TEMPLATES, *(s for s, _ in tasks.FACTS), *(a for _, a in tasks.FACTS),
             *FILLER_WORDS]
    words = set()
    for text in texts:
        words.update(w for w in re.findall(r"[A-Za-z0-9']+", text.replace("{", " {")) if w)
    return sorted(words - {"A", "B", "S", "s", "place", "object"} | {"a"})


def build_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ' Mary' and 'Mary' are one token each; ',' is its own token."""
    pieces = [EOS, PAD, UNK, " ", "\n"]
    pieces += [p for mark in PUNCTUATION for p in (mark, " " + mark)]
    pieces += [p for word in _words() for p in (word, " " + word)]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, model_max_length=max_length)


def build_model(tokenizer, args) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.n_positions, n_embd=args.d_model,
        n_layer=args.n_layers, n_head=args.n_heads, n_inner=args.d_mlp, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


# ---------------------------------------------------------------------------- training data

class Sampler:
    """Yields training sequences (ids, per-target loss weights) from the 'train' splits."""

    def __init__(self, tokenizer, seed: int, answer_weight: float):
        self.tokenizer, self.answer_weight = tokenizer, answer_weight
        self.rng = random.Random(f"train|{seed}")
        self.streams = {"ioi": tasks._ioi_stream(seed, "train"),
                        "facts": tasks._facts_stream(seed, "train")}
        self.word_ids = tasks.word_token_ids(tokenizer)

    def text_pair(self, name: str) -> list[tuple[list[int], list[float]]]:
        pair = tokenize_pair(*next(self.streams[name]).text, self.tokenizer, multi_token="refuse")
        out = []
        for prompt, answer in ((pair.clean_ids, pair.answer_id), (pair.corrupt_ids, pair.wrong_id)):
            weights = [1.0] * (len(prompt) - 1) + [self.answer_weight]
            out.append((list(prompt) + [answer], weights))
        return out

    def induction_pair(self) -> list[tuple[list[int], list[float]]]:
        """Two independent repeated random sequences (a corrupt prompt would only repeat
        its clean prompt with one token changed)."""
        return [self.induction_sequence(), self.induction_sequence()]

    def induction_sequence(self) -> tuple[list[int], list[float]]:
        """lead-in + R + gap + R, all tokens distinct except the repeat; loss on the repeat.

        The random lead-in and gap (each absent half the time) vary where R and its repeat
        sit, so that token matching (a real induction circuit) predicts the repeat better
        than heads attending a fixed distance back. With causal attention the repeat's
        targets R[1..n-1] train every prefix length at once."""
        n = self.rng.randint(MIN_REPEAT, MAX_REPEAT)
        lead, gap = (self.rng.choice([0, self.rng.randint(1, MAX_FILL)]) for _ in range(2))
        tokens = self.rng.sample(self.word_ids, lead + n + gap)
        lead_in, r, fill = tokens[:lead], tokens[lead:lead + n], tokens[lead + n:]
        # Only the repeat is predictable: weight its targets R[1..n-1].
        weights = [0.0] * (lead + n + gap) + [self.answer_weight] * (n - 1)
        return lead_in + r + fill + r, weights

    def batch(self, n_pairs: int):
        seqs = []
        for i in range(n_pairs):
            name = TASK_MIX[i % len(TASK_MIX)]
            seqs += self.induction_pair() if name == "induction" else self.text_pair(name)
        width = max(len(ids) for ids, _ in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in seqs])
        weights = torch.tensor([w + [0.0] * (width - 1 - len(w)) for _, w in seqs])
        return ids, mask, weights  # weights: [batch, width - 1], one per next-token target


def loss_fn(model, ids, mask, weights):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # [batch, pos-1, vocab]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return (nll * weights).sum() / weights.sum()


# ---------------------------------------------------------------------------- evaluation

@torch.no_grad()
def last_logits(model, prompts, pad_id: int, batch_size: int = 128) -> torch.Tensor:
    """Final-position logits [n, vocab] of prompts of any lengths (right padding)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([list(p) + [pad_id] * (width - len(p)) for p in chunk])
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in chunk])
        logits = model(input_ids=ids, attention_mask=mask).logits
        out.append(logits[torch.arange(len(chunk)), torch.tensor([len(p) - 1 for p in chunk])])
    return torch.cat(out)


def evaluate(model, tokenizer, n_pairs: int, seed: int = 0, split: str = "test") -> dict:
    """Per task: argmax accuracy and mean logit difference on clean and corrupt prompts."""
    model.eval()
    results = {}
    for name in tasks.TASKS:
        pairs = tasks.builtin_task(name, tokenizer=tokenizer, n_pairs=n_pairs, seed=seed, split=split)
        logits = last_logits(model, [p.clean_ids for p in pairs] + [p.corrupt_ids for p in pairs],
                             tokenizer.pad_token_id)
        right = torch.tensor([p.answer_id for p in pairs] + [p.wrong_id for p in pairs])
        other = torch.tensor([p.wrong_id for p in pairs] + [p.answer_id for p in pairs])
        rows = torch.arange(len(right))
        correct = (logits.argmax(-1) == right).float()
        diff = logits[rows, right] - logits[rows, other]
        n = len(pairs)
        results[name] = {
            "n_pairs": n,
            "clean_accuracy": correct[:n].mean().item(),
            "corrupt_accuracy": correct[n:].mean().item(),
            "clean_logit_diff": diff[:n].mean().item(),  # answer - wrong
            "corrupt_logit_diff": diff[n:].mean().item(),  # wrong - answer
        }
    model.train()
    return results


def format_results(results: dict) -> str:
    lines = [f"{'task':<10} {'clean acc':>9} {'corrupt acc':>11} {'clean ld':>9} {'corrupt ld':>10}"]
    for name, r in results.items():
        lines.append(f"{name:<10} {r['clean_accuracy']:>9.3f} {r['corrupt_accuracy']:>11.3f} "
                     f"{r['clean_logit_diff']:>9.2f} {r['corrupt_logit_diff']:>10.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main

def lr_factor(step: int, args) -> float:
    """Linear warmup, constant, then linear decay to 10% over the last 40% of the steps."""
    decay_start = 0.6 * args.steps
    decay = max(0.0, (step - decay_start) / (args.steps - decay_start))
    return min(1.0, (step + 1) / args.warmup) * (1.0 - 0.9 * decay)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="attrpatch/data/toy-gpt2", help="output folder")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch-pairs", type=int, default=32, help="pairs per step (2 sequences each)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--answer-weight", type=float, default=4.0, help="loss weight of the answer token")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--d-mlp", type=int, default=256)
    p.add_argument("--n-positions", type=int, default=64)
    p.add_argument("--eval-pairs", type=int, default=512, help="held-out pairs per task")
    p.add_argument("--eval-every", type=int, default=250,
                   help="print accuracy on 64 held-out pairs per task every N steps (0: never)")
    p.add_argument("--min-accuracy", type=float, default=0.95)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    tokenizer = build_tokenizer(args.n_positions)
    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, parameters {n_params:,}")
    sampler = Sampler(tokenizer, args.seed, args.answer_weight)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args))
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = loss_fn(model, *sampler.batch(args.batch_pairs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % 100 == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            print(format_results(evaluate(model, tokenizer, 64)), flush=True)
    train_seconds = time.perf_counter() - start

    model.eval()
    results = evaluate(model, tokenizer, args.eval_pairs)
    print(f"training time {train_seconds:.1f}s ({args.steps} steps, {args.threads} thread(s))")
    print(f"held-out accuracy ({args.eval_pairs} pairs per task, split='test', seed=0):")
    print(format_results(results))
    worst = min(min(r["clean_accuracy"], r["corrupt_accuracy"]) for r in results.values())
    if worst < args.min_accuracy:
        print(f"FAILED: held-out accuracy {worst:.3f} < {args.min_accuracy}; nothing saved",
              file=sys.stderr)
        return 1

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    portable_tokenizer(out)
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes its file owner-only
    record = {
        "command": " ".join(["python scripts/train_toy_model.py", *(sys.argv[1:] if argv is None else argv)]),
        "seed": args.seed, "steps": args.steps, "threads": args.threads,
        "args": vars(args), "n_parameters": n_params, "vocab_size": len(tokenizer),
        "config": model.config.to_diff_dict(),
        "train_seconds": round(train_seconds, 1),
        "heldout": results,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
