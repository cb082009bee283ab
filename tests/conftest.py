"""Tiny random models of every supported family, and prompt pairs for them.

Weights are drawn with a larger initializer range than the libraries' default (0.02), so that
activations, logits and patching effects are O(1) and tolerances mean something.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import transformers as tf

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: threads only add spin-wait overhead

VOCAB = 40
N_POS = 7
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=64, initializer_range=0.3,
              bos_token_id=0, eos_token_id=1, pad_token_id=0)
GQA = dict(num_key_value_heads=2)
# Llama 3.x: model_type llama with "rope_scaling" {"rope_type": "llama3"}; a short original context (16)
# makes the scaling move the frequencies of an 8-wide head (the real value is 8192).
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16, rope_theta=500_000.0)
# Gemma 3: one KV head (as in its 1B size), sliding and full layers with a rope base per kind.
GEMMA3_LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]
GEMMA3_ROPE = {"sliding_attention": dict(rope_type="default", rope_theta=10_000.0),
               "full_attention": dict(rope_type="default", rope_theta=1_000_000.0)}

CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_inner=48,
                                  n_positions=64, initializer_range=0.3, bos_token_id=0, eos_token_id=1),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**COMMON),
    "llama": lambda: tf.LlamaConfig(**COMMON, **GQA),
    "llama3": lambda: tf.LlamaConfig(**COMMON, **GQA, rope_scaling=LLAMA3_ROPE),
    "mistral": lambda: tf.MistralConfig(**COMMON, **GQA),
    "qwen2": lambda: tf.Qwen2Config(**COMMON, **GQA),
    "gemma2": lambda: tf.Gemma2Config(**COMMON, **GQA, head_dim=8, sliding_window=4),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**COMMON, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                                               sliding_window=4, layer_types=GEMMA3_LAYERS,
                                               rope_parameters=GEMMA3_ROPE),
    "qwen3": lambda: tf.Qwen3Config(**COMMON, **GQA, head_dim=8),
    "olmo2": lambda: tf.Olmo2Config(**COMMON, **GQA),
    "phi": lambda: tf.PhiConfig(**COMMON),
    "phi3": lambda: tf.Phi3Config(**COMMON, **GQA),
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                ffn_dim=48, max_position_embeddings=64, word_embed_proj_dim=32, init_std=0.3,
                                bos_token_id=0, eos_token_id=1, pad_token_id=0),
}
FAMILIES = tuple(CONFIGS)  # test names: "llama3" is model_type llama with Llama 3 rope scaling
KV_HEADS = {"llama": 2, "llama3": 2, "mistral": 2, "qwen2": 2, "qwen3": 2, "olmo2": 2, "gemma2": 2, "phi3": 2,
            "gemma3_text": 1}  # the others: one per query head (4)
POST_NORM = ("gemma2", "gemma3_text", "olmo2")  # attn_out/mlp_out are norms of the attention/MLP outputs


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    config = CONFIGS[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    impl = "eager" if family == "gemma2" else None
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    return model.to(dtype).eval()


class Pair:
    def __init__(self, clean, corrupt, answer, wrong):
        self.clean_ids, self.corrupt_ids, self.answer_id, self.wrong_id = clean, corrupt, answer, wrong


def random_pairs(n: int = 3, n_pos: int = N_POS, seed: int = 0, lengths=None, changed=(1, 3)):
    """Random prompt pairs; corrupt differs from clean at the ``changed`` positions (symmetric replacement)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        length = n_pos if lengths is None else lengths[i]
        clean = torch.randint(2, VOCAB, (length,), generator=g).tolist()
        corrupt = list(clean)
        for p in changed:
            if p < length:
                corrupt[p] = 2 + (clean[p] - 2 + 1 + i) % (VOCAB - 2)
        answer, wrong = torch.randperm(VOCAB - 2, generator=g)[:2].add(2).tolist()
        pairs.append(Pair(clean, corrupt, answer, wrong))
    return pairs


def write_task(path, pairs):
    """A token-id JSONL task file of ``pairs``."""
    import json
    path.write_text("".join(json.dumps({"clean_ids": p.clean_ids, "corrupt_ids": p.corrupt_ids,
                                        "answer_id": p.answer_id, "wrong_id": p.wrong_id}) + "\n" for p in pairs))
    return path


def saved_model(folder, family="gpt2", **overrides):
    """A tiny model of ``family`` saved to ``folder`` (safetensors); returns (model, folder)."""
    model = tiny_model(family, **overrides)
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def load_script(path: str):
    """A script of the repository (path relative to its root, e.g. "scripts/layout.py") imported as a module."""
    file = Path(__file__).resolve().parents[1] / path
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
