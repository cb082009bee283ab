"""EAP equals exact edge patching where the metric is linear in the edge, on every family with edges: with
the final norm (and soft-capping) removed, the logits are linear in the residual stream, so every edge into
``logits`` (any sender: the embeddings, a head, an MLP, in a pre-norm, parallel or post-norm block) moves
logit_diff by exactly its gradient product, whole or per position, in both directions."""

import pytest
import torch

import attrpatch as ap
from attrpatch.methods.edges.eap import attribute_edges
from attrpatch.methods.edges.patching import patch_edges
from attrpatch.methods.edges.positions import PositionEdge
from conftest import random_pairs, tiny_model
from test_attribute import _linear_readout


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_eap_equals_exact_edge_patching_into_a_linear_readout(family, direction):
    model = tiny_model(family, dtype=torch.float64)
    _linear_readout(model)
    batch = ap.make_batch(random_pairs(3))
    scores = attribute_edges(model, batch, direction=direction, positions=True)
    edges = [e for e in scores.graph.edges() if e.receiver == "logits"]
    last = batch.n_pos - 1
    at_last = [PositionEdge(e.sender, e.receiver, last) for e in edges]
    exact = patch_edges(model, batch, [*edges, *at_last], direction=direction).values[:, 0]
    whole = torch.tensor([scores.score(e, "logit_diff") for e in edges], dtype=exact.dtype)
    table = scores.by_position["logit_diff"]
    receiver = scores.graph.receiver_index["logits"]
    per_pos = torch.stack([table[scores.graph.sender_index[e.sender], receiver, last] for e in edges]).to(exact.dtype)
    assert exact.abs().max() > 1e-2  # the comparison is not between zeros
    tol = 1e-5 if family in ("gemma2", "gemma3_text", "olmo2") else 1e-8  # RMSNorm computes in float32 there
    torch.testing.assert_close(whole, exact[:len(edges)], atol=tol, rtol=tol)
    torch.testing.assert_close(per_pos, exact[len(edges):], atol=tol, rtol=tol)
