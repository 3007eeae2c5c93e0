"""stprune's parts against slow references written from its definition (README "stprune")."""

from __future__ import annotations

import math

import torch

from tests.test_peers import stage_input
from vidsparse.pruning.baselines import lattice
from vidsparse.pruning.stprune import STPrune, diverse_top_k, question_relevance


def diverse_reference(relevance, features, k, weight):
    """Maximal marginal relevance in float64 loops."""
    rel = relevance.double().tolist()
    low, high = min(rel), max(rel)
    gain = [(r - low) / (high - low) if high > low else 0.0 for r in rel]
    rows = features.double().tolist()

    def cos(a, b):
        return sum(p * q for p, q in zip(a, b, strict=True)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))

    picked = []
    for _ in range(min(k, len(rel))):
        best, best_value = None, -math.inf
        for i in range(len(rel)):
            if i in picked:
                continue
            value = gain[i] - weight * max([max(0.0, cos(rows[i], rows[j])) for j in picked], default=0.0)
            if value > best_value + 1e-12:
                best, best_value = i, value
        picked.append(best)
    return sorted(picked)


def test_diverse_top_k_is_maximal_marginal_relevance():
    g = torch.Generator().manual_seed(0)
    relevance = torch.rand(40, generator=g)
    features = torch.randn(40, 16, generator=g)
    for k in (1, 5, 17, 40):
        for weight in (0.0, 0.5, 1.0, 3.0):
            assert diverse_top_k(relevance, features, k, weight).tolist() == diverse_reference(
                relevance, features, k, weight), (k, weight)
    # Without the redundancy term it is plain top-k; with it, a duplicate of a pick waits its turn.
    assert diverse_top_k(relevance, features, 5, 0.0).tolist() == sorted(torch.topk(relevance, 5).indices.tolist())
    twins = torch.cat([features[:1], features[:1], features[1:3]])
    assert diverse_top_k(torch.tensor([1.0, 0.99, 0.5, 0.4]), twins, 2, 1.0).tolist() in ([0, 2], [0, 3])


def test_question_relevance_weighs_raters_and_last_token_equally():
    attention = torch.tensor([[0.2, 0.2, 0.0, 0.0], [0.0, 0.4, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    # raters (rows 0-1): mean [.1, .3, 0, 0] -> [.25, .75, 0, 0]; last row -> [0, 0, .5, .5]
    torch.testing.assert_close(question_relevance(attention), torch.tensor([0.125, 0.375, 0.25, 0.25]))


def test_first_stage_is_the_spatio_temporal_lattice_at_twice_the_budget():
    x = torch.randn(8 * 17, 8)
    for budget, expected in ((10, 20), (50, 100), (100, 136)):
        stage = stage_input(x, 8, 17, budget)
        selection = STPrune().select(stage)
        assert selection.keep.tolist() == lattice(stage.frames, stage.rows, stage.cols, expected).tolist()
        assert selection.in_clip_order and torch.bincount(stage.frames[selection.keep]).min() >= expected // 8
