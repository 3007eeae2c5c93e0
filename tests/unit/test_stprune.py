"""stprune's parts against slow references written from its definition (docs/methods.md "stprune")."""

from __future__ import annotations

import math

import torch

from tests.references.test_peers import stage_input
from tests.unit.test_methods import official_split
from vidsparse.pruning.baselines import lattice
from vidsparse.pruning.sparsevlm import Raters
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
    raters = torch.tensor([True, True, False])
    torch.testing.assert_close(question_relevance(attention, raters), torch.tensor([0.125, 0.375, 0.25, 0.25]))


def test_first_stage_is_the_spatio_temporal_lattice_at_twice_the_budget():
    x = torch.randn(8 * 17, 8)
    for budget, expected in ((10, 20), (50, 100), (100, 136)):
        stage = stage_input(x, 8, 17, budget)
        selection = STPrune().select(stage)
        assert selection.keep.tolist() == lattice(stage.grid, expected)
        assert selection.in_clip_order and torch.bincount(stage.frames[selection.keep]).min() >= expected // 8


def question_stage_reference(attention, hidden, budget):
    """Stage 2 from docs/methods.md in float64 loops: relevance = 1/2 raters (rows 0..r-1, their mean) +
    1/2 last prompt token (row r), each normalised to sum 1; K by maximal marginal relevance (weight
    1); the pool = the best int(0.3 x deleted) + 1 deleted by relevance (at least C), K + C = B by the
    official split. Returns (kept, pool, C)."""
    rows = attention.double().tolist()
    raters = [sum(column) / (len(rows) - 1) for column in zip(*rows[:-1], strict=True)]
    last = rows[-1]
    relevance = [0.5 * a / sum(raters) + 0.5 * b / sum(last) for a, b in zip(raters, last, strict=True)]
    kept_count, clusters = official_split(budget, len(relevance))
    kept = diverse_reference(torch.tensor(relevance), hidden, kept_count, 1.0)
    deleted = [i for i in range(len(relevance)) if i not in kept]
    pool_count = max(int(0.3 * len(deleted)) + 1, clusters) if clusters else 0
    pool = sorted(deleted, key=lambda i: (-relevance[i], i))[:pool_count]
    return kept, pool, clusters


def test_question_stage_keeps_relevant_diverse_tokens_and_recycles_the_best_deleted():
    g = torch.Generator().manual_seed(1)
    n = 68  # stage 1's lattice of 2B for B = 34, over 4 frames
    hidden = torch.randn(n, 16, generator=g)
    attention = torch.rand(4, n, generator=g) ** 3  # three raters, then the last prompt token
    for budget in (1, 5, 17, 34, 50, n - 1):
        stage = stage_input(hidden, 4, 17, budget, layer=1, attention=attention,
                            facts=Raters(torch.tensor([True, True, True, False]), ["a", "b", "c", "?"]))
        selection = STPrune().select(stage)
        kept, pool, clusters = question_stage_reference(attention, hidden, budget)
        assert selection.keep.tolist() == kept, budget
        assert sorted(selection.merge_source.tolist()) == sorted(pool), budget
        assert selection.merge_anchor.numel() == clusters and set(selection.merge_anchor.tolist()) <= set(pool)
        assert selection.size == budget and selection.in_clip_order


def test_stages_before_layer_0_and_after_layer_1():
    assert STPrune().default_stages(32) == [-1, 1]
    assert STPrune().default_stages(8) == [-1, 1]
    assert STPrune().default_stages(2) == [-1, 0]  # a stage after the last layer would change nothing
