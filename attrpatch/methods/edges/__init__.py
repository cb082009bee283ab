"""methods/edges: edges between components (sender -> receiver paths).

    graph         senders, receivers, edges, their names, and where each lives in the model
    eap           ``attribute_edges``: EAP and EAP-IG, every edge's score from one backward (gradients.Receiving)
    patching      ``patch_edges``: exact edge (path) patching
    sources       ``--ablation`` for edges: zero or mean senders as the source, noising only
    circuits      ``patch_circuits``: many large edge sets (a faithfulness curve's circuits) as dense masks,
                  each sender's write computed once per pass
"""
