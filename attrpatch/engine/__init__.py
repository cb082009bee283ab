"""Stage 3, engine: running the model.

    hooks         every hook installed through one context manager that removes it in ``finally``
    splicing      a sparse dictionary spliced into the forward with its error term (outputs unchanged)
    forward       forward passes that read the last real token's logits; the unembedding; block calls
    partial       partial forwards: a pass resumed at a block (and, in a causal model, at a position)
    metrics       the metrics on the last-token logits, and their normalisation
    distributed   data parallelism over prompts with torch.distributed (torchrun)
    forked        work in a forked second process on a CPU (a screen's second direction, half the figures)
    memory        live tensor bytes per phase and device, on real tensors (measured) or meta ones (planned)
"""
