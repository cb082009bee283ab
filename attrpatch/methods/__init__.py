"""Stage 4, methods: what is computed on the model (definitions: docs/methods.md).

Estimators, one module each, with its formula, direction and cost in its docstring:

    atp           attribution patching: delta . gradient at the receiver
    ig            integrated gradients along the line between the two runs' token embeddings
    graddrop      AtP*'s GradDrop: one more backward per layer, that layer's writes cut from the gradient
    qk_fix        AtP*'s QK fix: the attention pattern change from a query or key, computed exactly
    atp_star      AtP*: the QK fix for q and k, GradDrop for every other site
    relp          relevance patching: AtP with LRP rules in the backward pass
    gradients     the core they share: the source cache, the receiving run with grad, the products
    blockwise     the same backward block by block (``recompute=True``): less memory, ~2 more forwards
    attribution   ``attribute``: any estimator over a prompt set, in chunks (``Scores``)

Exact patching and what builds on it:

    patching      ``patch``: exact activation patching, batched and resumed (``Effects``); ablation values
    passes        how patched copies are grouped into forward passes, and what a pass costs
    ablation      zero, mean and resample ablations as the source of a screen (noising only)
    windows       sliding-window patching: W adjacent layers patched together
    diagnostics   attention saturation and relative activation change, measured on the runs
    frozen        patching with the attention patterns or norm scales frozen at the receiver's

Edges:

    edge_graph    senders, receivers, edges, their names, and where each lives in the model
    edges         ``attribute_edges``: EAP and EAP-IG, every edge's score from one backward
    edge_patching ``patch_edges``: exact edge (path) patching
    circuit_patching ``patch_circuits``: many large edge sets (a faithfulness curve's circuits) as dense masks,
                  each sender's write computed once per pass
"""
