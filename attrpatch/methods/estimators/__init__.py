"""methods/estimators: one module per estimator, with its formula, direction and cost in its docstring.

    atp           attribution patching: delta . gradient at the receiver
    ig            integrated gradients along the line between the two runs' token embeddings
    graddrop      AtP*'s GradDrop: one more backward per layer, that layer's writes cut from the gradient
    qk_fix        AtP*'s QK fix: the attention pattern change from a query or key, computed exactly
    atp_star      AtP*: the QK fix for q and k, GradDrop for every other site
    relp          relevance patching: AtP with LRP rules in the backward pass
    gim           gradient interaction modifications: AtP with GIM's norm, softmax-temperature and q/k/v rules
                  in the backward pass (``relp_gim``: with RelP's rules)
    gradients     the core they share: the source cache, the receiving run with grad, the products
    features      AtP of dictionary latents and error terms, from the same backward as the sites
    feature_ig    IG of one dictionary's latents and error along its own line (Marks et al. 2024)
    blockwise     the same backward block by block (``recompute=True``): less memory, ~2 more forwards
    attribution   ``attribute``: any estimator over a prompt set, in chunks (``Scores``); ``ESTIMATORS``

A new estimator is a module here with ``score(chunk)`` and ``passes(...)``, registered in ``ESTIMATORS``.
"""
