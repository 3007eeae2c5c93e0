"""Method parts in isolation, on hand-made tensors where the answer is known."""

import pytest
import torch

from vidsparse.pruning.base import Selection, StageInput, top_k
from vidsparse.pruning.sparsevlm import SparseVLM, choose_raters, dpc_knn, num_clusters, recycling_split
from vidsparse.pruning.stage import VisualBlock, apply_selection
from vidsparse.pruning.tome import bipartite_merge, groups_to_selection


def test_raters_are_text_rows_above_mean_relevance():
    visual = torch.tensor([[10.0, 0.0], [10.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    # V T^T = [10, 0, 10, 0] per visual row: softmax ~ [.5, 0, .5, 0] -> rows 0 and 2 beat the mean .25
    assert choose_raters(visual, text).tolist() == [0, 2]


def test_raters_fall_back_to_all_text_when_none_stands_out():
    assert choose_raters(torch.ones(3, 2), torch.ones(4, 2)).tolist() == [0, 1, 2, 3]


def stage(attention, budget, is_last, frames=None):
    n = attention.shape[1]
    return StageInput(index=0, num_stages=1 if is_last else 2, layer=1, num_visual=n, budget=budget,
                      hidden=torch.zeros(n, 4), frames=torch.zeros(n, dtype=torch.long) if frames is None else frames,
                      rows=torch.zeros(n, dtype=torch.long), cols=torch.arange(n),
                      attention=attention, min_per_frame=0, generator=torch.Generator())


def test_rank_rule_for_intermediate_stages():
    rows = torch.rand(2, 10, generator=torch.Generator().manual_seed(0))
    attention = torch.cat([rows, rows[:1] + rows[1:]])  # 3 raters, rank 2
    method = SparseVLM()
    # Lv = 10, rank 2: delete floor(0.5 * (10 - 2)) = 4 -> keep 6, never below the budget.
    assert method.stage_size(stage(attention, 2, is_last=False)) == 6
    assert method.stage_size(stage(attention, 8, is_last=False)) == 8
    assert method.ranks == [2, 2]
    assert method.stage_size(stage(attention, 3, is_last=True)) == 3


@pytest.mark.parametrize("target, visual", [(194, 2056), (64, 2056), (7, 136), (1, 136), (135, 136), (20, 136)])
def test_recycling_count_solves_k_plus_c_equals_budget(target, visual):
    kept, clusters = recycling_split(target, visual)
    assert kept + clusters == target and kept >= 0
    assert clusters == num_clusters(visual - kept) or clusters == target


def test_recycling_split_by_hand():
    # K = 136 kept: 1920 deleted, pool int(0.3 * 1920) = 576, C = 576 // 10 + 1 = 58; 136 + 58 = 194.
    assert recycling_split(194, 2056) == (136, 58)
    assert recycling_split(136, 136) == (136, 0)
    assert recycling_split(200, 136) == (136, 0)


def test_dpc_knn_finds_three_blobs_and_merges_to_their_means():
    generator = torch.Generator().manual_seed(0)
    centres_true = torch.tensor([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0], [0.0, 20.0, 5.0]])
    blob = torch.tensor([0, 1, 2, 0, 2, 1, 1, 0, 2, 2, 0, 1])
    points = centres_true[blob] + 0.3 * torch.randn(12, 3, generator=generator)
    centres, assignment = dpc_knn(points, 3)
    assert sorted(blob[centres].tolist()) == [0, 1, 2]
    # Same partition as the blobs, cluster ids in the order of the centres returned.
    assert torch.equal(blob[centres][assignment], blob)
    block = VisualBlock(0, torch.arange(12), torch.zeros(12, dtype=torch.bool))
    selection = Selection(torch.zeros(0, dtype=torch.long), torch.arange(12), assignment, centres)
    merged, _, _ = apply_selection(points[None], torch.arange(12)[None], block, selection, "keep")
    for slot, centre in enumerate(centres.tolist()):
        torch.testing.assert_close(merged[0, slot], points[blob == blob[centre]].mean(0))


def test_dpc_knn_is_deterministic_on_ties():
    points = torch.tensor([[0.0], [0.0], [5.0], [5.0]])
    first = dpc_knn(points, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, dpc_knn(points, 2), strict=True))
    assert first[0].tolist() == [0, 2]  # equal densities: the lower index wins


def test_top_k_breaks_ties_by_index_and_honours_the_floor():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.0, 0.0])
    frames = torch.tensor([0, 0, 0, 1, 1, 1])
    assert top_k(scores, 2, frames).tolist() == [0, 1]
    assert top_k(scores, 3, frames, min_per_frame=1).tolist() == [0, 1, 3]
    assert top_k(scores, 4, frames, min_per_frame=2).tolist() == [0, 1, 3, 4]


def test_tome_merges_to_exactly_b_with_means_of_members():
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    for target in (1, 7, 15, 29, 30):
        group = bipartite_merge(x, target)
        assert group.unique().numel() == target
        selection = groups_to_selection(group)
        assert selection.size == target
        for slot, anchor in enumerate(selection.merge_anchor.tolist()):
            members = selection.merge_source[selection.merge_target == slot]
            assert anchor == int(members.min()) and members.numel() >= 2


def test_tome_merges_the_most_similar_pair_first():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.05]])
    # A = {0, 2}, B = {1, 3}: 0 matches 3 (cos ~1), 2 matches 1 (cos 1); the best pair merges first.
    group = bipartite_merge(x, 3)
    assert group[2] == group[1] and group.unique().numel() == 3
