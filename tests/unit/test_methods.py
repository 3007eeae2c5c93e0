"""Method parts in isolation, on hand-made tensors where the answer is known."""

import pytest
import torch

from vidsparse.models.visual import ClipGrid
from vidsparse.pruning.base import Selection, StageInput, top_k
from vidsparse.pruning.clustering import dpc_knn
from vidsparse.pruning.sparsevlm import Raters, SparseVLM, choose_raters, num_clusters, recycling_split
from vidsparse.pruning.tome import bipartite_merge, groups_to_selection
from vidsparse.stage import VisualBlock, apply_selection, merged_tokens


def test_raters_are_text_rows_above_mean_relevance():
    visual = torch.tensor([[10.0, 0.0], [10.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    # V T^T = [10, 0, 10, 0] per visual row: softmax ~ [.5, 0, .5, 0] -> rows 0 and 2 beat the mean .25
    assert choose_raters(visual, text).tolist() == [True, False, True, False]


def test_raters_fall_back_to_all_text_when_none_stands_out():
    assert choose_raters(torch.ones(3, 2), torch.ones(4, 2)).tolist() == [True] * 4


def stage(attention, budget, is_last, frames=None, facts=None):
    n = attention.shape[1]
    return StageInput(index=0, num_stages=1 if is_last else 2, layer=1, num_visual=n, budget=budget,
                      hidden=torch.zeros(n, 4), frames=torch.zeros(n, dtype=torch.long) if frames is None else frames,
                      rows=torch.zeros(n, dtype=torch.long), cols=torch.arange(n),
                      attention=attention, min_per_frame=0, generator=torch.Generator(), facts=facts,
                      grid=ClipGrid(1 if frames is None else int(frames.max()) + 1, 1, n, False))


def test_rank_rule_for_intermediate_stages():
    rows = torch.rand(2, 10, generator=torch.Generator().manual_seed(0))
    attention = torch.cat([rows, rows[:1] + rows[1:]])  # 3 raters, rank 2
    method, facts = SparseVLM(), Raters(torch.ones(3, dtype=torch.bool), ["a", "b", "c"])
    # Lv = 10, rank 2: delete floor(0.5 * (10 - 2)) = 4 -> keep 6, never below the budget.
    assert method.stage_size(stage(attention, 2, is_last=False, facts=facts)) == 6
    assert method.stage_size(stage(attention, 8, is_last=False, facts=facts)) == 8
    assert facts.ranks == [2, 2] and method.report(facts) == {"raters": "a b c", "ranks": [2, 2]}
    assert method.stage_size(stage(attention, 3, is_last=True)) == 3


@pytest.mark.parametrize("target, visual", [(194, 2056), (64, 2056), (7, 136), (1, 136), (135, 136), (20, 136)])
def test_recycling_count_solves_k_plus_c_equals_budget(target, visual):
    kept, clusters = recycling_split(target, visual)
    assert kept + clusters == target and kept >= 0
    assert clusters == num_clusters(visual - kept) or clusters == target


def official_split(budget, visual):
    """Slow reference of the official rule (SparseVLM's code and LightCompress), searched by brute
    force: with K tokens kept, the d = n - K deleted give a pool of int(0.3 d) + 1 and
    pool // 10 + 1 clusters; the split is the largest K whose K + clusters is the budget."""
    if budget >= visual:
        return visual, 0
    for kept in range(budget, -1, -1):
        clusters = (int((visual - kept) * 0.3) + 1) // 10 + 1
        if kept + clusters == budget:
            return kept, clusters
    return 0, budget  # too small a budget to hold every cluster: all of it goes to clusters


@pytest.mark.parametrize("visual", [136, 2056])
def test_recycling_split_follows_the_official_rule_at_every_budget(visual):
    for budget in range(1, visual + 2):
        assert recycling_split(budget, visual) == official_split(budget, visual), budget


def test_recycling_split_by_hand():
    # K = 136 kept: 1920 deleted, pool int(0.3 * 1920) + 1 = 577, C = 577 // 10 + 1 = 58; 136 + 58 = 194.
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
    block = VisualBlock(0, torch.arange(12), torch.zeros(12, dtype=torch.bool), torch.zeros(3, 12, dtype=torch.long))
    selection = Selection(torch.zeros(0, dtype=torch.long), torch.arange(12), assignment, centres)
    merged, _, _ = apply_selection(points[None], torch.arange(12)[None], block, selection, "keep")
    for slot, centre in enumerate(centres.tolist()):
        torch.testing.assert_close(merged[0, slot], points[blob == blob[centre]].mean(0))


def test_density_peaks_of_several_groups_at_once_are_each_groups_own():
    """Groups of different sizes padded into one batch (the padding filled with far, dense points that
    would win if it counted): each group's centres and assignment are those of the slow reference on
    that group alone, and those of `dpc_knn` on it."""
    from tests.references.test_peer_holitom import dpc_reference
    from vidsparse.pruning.clustering import dpc_knn_groups

    generator = torch.Generator().manual_seed(3)
    counts, clusters, neighbours = [9, 30, 17, 2], [3, 7, 17, 1], [7, 7, 4, 7]
    groups = [torch.randn(n, 6, generator=generator, dtype=torch.float64) * 3 for n in counts]
    padded = torch.full((len(counts), max(counts), 6), 50.0, dtype=torch.float64)
    for g, group in enumerate(groups):
        padded[g, : counts[g]] = group
    found = dpc_knn_groups(padded, counts, clusters, neighbours)
    for group, c, k, (centres, assignment) in zip(groups, clusters, neighbours, found, strict=True):
        expected_centres, members = dpc_reference(group.tolist(), c, min(k, group.shape[0]))
        assert centres.tolist() == expected_centres
        assert all(centres[assignment[member]].item() == centre for member, centre in members.items())
        alone = dpc_knn(group, c, k)
        assert torch.equal(alone[0], centres) and torch.equal(alone[1], assignment)


def test_dpc_knn_in_float16_finds_the_clusters_around_a_large_common_part():
    """float16 states that share a large component (an offset of 100, a spread of 0.1 that float16
    holds and bfloat16 would round away): centred in float16 before the bfloat16 product."""
    generator = torch.Generator().manual_seed(0)
    label = torch.arange(64) % 4
    x = 100 + 0.1 * torch.randn(4, 1024, generator=generator)[label] + 0.05 * torch.randn(64, 1024, generator=generator)
    centres, assignment = dpc_knn(x.to(torch.float16), 4, 7)
    assert sorted(label[centres].tolist()) == [0, 1, 2, 3] and torch.equal(label[centres][assignment], label)


def test_flashvid_in_float16_never_keeps_a_token_twice():
    """Large float16 states (an offset of 5 in 3584 channels) and tokens of no saliency: the
    attention-and-diversity scores overflowed float16 to inf, and inf x 0 to NaN, which picked tokens
    again; they are computed in bfloat16."""
    from vidsparse.pruning.flashvid import compress_clip

    generator = torch.Generator().manual_seed(1)
    offset = 5 * torch.sign(torch.randn(3584, generator=generator))
    x = (offset + torch.randn(8 * 16, 3584, generator=generator)).to(torch.float16)
    saliency = torch.rand(128, generator=generator)
    saliency[::5] = 0
    selection = compress_clip(x, saliency, ClipGrid(8, 4, 4, False), 40)
    kept = selection.keep.tolist()
    assert selection.size == 40 and len(set(kept)) == len(kept)
    assert not set(kept) & set(selection.merge_source.tolist())


def test_a_token_is_flagged_merged_when_it_mixes_several_clip_tokens():
    """A group flags its row merged when a source besides its anchor weighs something, or when the
    anchor was already a mix from an earlier stage; a group that is its anchor alone is that token."""
    earlier = torch.tensor([True, False, False, False, False, False])
    block = VisualBlock(0, torch.arange(6), earlier, torch.zeros(3, 6, dtype=torch.long))
    selection = Selection(torch.zeros(0, dtype=torch.long),
                          torch.tensor([0, 1, 2, 3, 4, 5]),  # 0 alone; 1 alone; 3 joins 2; 5 weighs 0 in 4's group
                          torch.tensor([0, 1, 2, 2, 3, 3]), torch.tensor([0, 1, 2, 4]),
                          torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0]))
    _, _, after = apply_selection(torch.randn(1, 6, 4), torch.arange(6)[None], block, selection, "keep")
    assert after.merged.tolist() == [True, False, True, False]


@pytest.mark.parametrize("groups_at_once", [1, 3, 256])
def test_merged_tokens_are_weighted_means_of_their_members_in_any_chunking(monkeypatch, groups_at_once):
    """Weighted group means (a token in several groups, unequal weights) against a float64 loop, made
    one group at a time, in chunks that split the groups unevenly, and all at once."""
    monkeypatch.setattr("vidsparse.stage.GROUPS_AT_ONCE", groups_at_once)
    g = torch.Generator().manual_seed(3)
    visual = torch.randn(1, 10, 6, generator=g)
    source = torch.tensor([0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9])
    target = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4, 4, 4])
    weight = torch.rand(11, generator=g) + 0.1
    selection = Selection(torch.zeros(0, dtype=torch.long), source, target, torch.tensor([0, 2, 4, 5, 7]), weight)
    merged = merged_tokens(selection, visual)
    for group in range(5):
        members = (target == group).nonzero().squeeze(1).tolist()
        expected = sum(weight[i].double() * visual[0, source[i]].double() for i in members) / sum(
            weight[i].double() for i in members)
        torch.testing.assert_close(merged[0, group].double(), expected, atol=1e-6, rtol=1e-6)


def test_dpc_knn_is_deterministic_on_ties():
    points = torch.tensor([[0.0], [0.0], [5.0], [5.0]])
    first = dpc_knn(points, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, dpc_knn(points, 2), strict=True))
    assert first[0].tolist() == [0, 2]  # equal densities: the lower index wins


@pytest.mark.parametrize(("k", "length"), [(1, 40), (2, 40), (4, 40), (8, 40), (9, 40), (12, 40), (40, 40),
                                           (4, 600)])
def test_the_k_smallest_values_are_a_full_sorts_first_k_and_the_input_stays(k, length):
    """Rows with repeated values and +inf (padding), in passes of a minimum (few k of short rows) or by
    topk (more k, long rows); no more than a row holds."""
    from vidsparse.pruning.clustering import smallest

    generator = torch.Generator().manual_seed(k)
    x = torch.randint(0, 6, (3, 5, length), generator=generator).float()
    x[0, :, 30:] = torch.inf
    before = x.clone()
    assert torch.equal(smallest(x, k), torch.sort(x, dim=-1).values[..., :k])
    assert torch.equal(x, before)
    with pytest.raises(ValueError):
        smallest(x, length + 1)


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


def clip_geometry(frames, grid):
    """frames / rows / cols of a clip's visual tokens: per frame CLS (-1, -1), then the patches row-major."""
    per_frame = grid * grid + 1
    index = torch.arange(frames * per_frame)
    patch = index % per_frame - 1
    is_cls = patch < 0
    return index // per_frame, torch.where(is_cls, -1, patch // grid), torch.where(is_cls, -1, patch % grid)


def uniform_kept(frames, grid, budget):
    from vidsparse.pruning.baselines import UniformPruning

    frame, row, col = clip_geometry(frames, grid)
    n = frame.numel()
    keep = UniformPruning().select(StageInput(
        index=0, num_stages=1, layer=-1, num_visual=n, budget=budget, hidden=torch.zeros(n, 4), frames=frame,
        rows=row, cols=col, attention=None, min_per_frame=0, generator=torch.Generator(),
        grid=ClipGrid(frames, grid, grid, True))).keep
    return frame[keep], row[keep], col[keep]


def test_uniform_covers_space_and_space_across_time():
    # 10% of 8 x 17 tokens: 1 or 2 a frame. Together the frames cover every row and column of the grid.
    frame, row, col = uniform_kept(8, 4, 14)
    assert torch.bincount(frame).tolist() == [2, 2, 2, 2, 2, 2, 1, 1] and (row >= 0).all()
    places = set(zip(row.tolist(), col.tolist(), strict=True))
    assert len(places) >= 12 and {r for r, _ in places} == {c for _, c in places} == {0, 1, 2, 3}
    # A square number of picks in a frame: one in each cell of the matching coarse grid, every frame,
    # and the picks move from frame to frame.
    for grid, per_frame in ((8, 4), (8, 16), (4, 4)):
        frame, row, col = uniform_kept(8, grid, 8 * per_frame)
        side = grid // int(per_frame**0.5)
        for f in range(8):
            cells = sorted(zip((row[frame == f] // side).tolist(), (col[frame == f] // side).tolist(), strict=True))
            assert cells == sorted({(r, c) for r in range(grid // side) for c in range(grid // side)}), (grid, f)
        moved = [set(zip(row[frame == f].tolist(), col[frame == f].tolist(), strict=True)) for f in range(8)]
        assert all(moved[f] != moved[f + 1] for f in range(7)) or side == 1
