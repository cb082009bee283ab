"""methods/patching: exact activation patching and what builds on it.

    exact         ``patch``: exact activation patching, batched and resumed (``Effects``)
    passes        how patched copies are grouped into forward passes, and what a pass costs
    windows       sliding-window patching: W adjacent layers patched together
    diagnostics   attention saturation and relative activation change, measured on the runs
    features      exact patching of dictionary latents and error terms (``patch_features``)
    frozen        patching with the attention patterns or norm scales frozen at the receiver's
"""
