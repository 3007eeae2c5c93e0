"""HoliTom against slow references written from its formulas and the official loops
(cokeshao/HoliTom `holitom/llava_arch.py`, `holitom/modeling_qwen2.py`), in float64 and plain Python."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.references.test_peers import stage_input
from vidsparse.pruning.holitom import HoliTom, merge_into_kept

FRAMES, PLACES, DIM = 8, 17, 32


def cos(a, b):
    return sum(p * q for p, q in zip(a, b, strict=True)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))


def official_windows(static_places, frames):
    """`select_static_windows`, transcribed: dp over prefixes, a window [j + 1, i] saves
    (i - j - 1) x its static places; strict improvement only."""
    dp, prev = [0] * frames, [0] * frames
    for i in range(frames):
        max_val, best_j = (dp[i - 1] if i > 0 else 0), i
        for size in range(2, i + 2):
            j = i - size
            value = (dp[j] if j >= 0 else 0) + (i - j - 1) * len(static_places(j + 1, i))
            if value > max_val:
                max_val, best_j = value, j + 1
        dp[i], prev[i] = max_val, best_j
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1], dp[-1]


def most_saved_by_any_cut(static_places, frames):
    """Every way to cut the frames into windows, tried: the most tokens averaging can save."""
    best = 0
    for cuts in itertools.product([False, True], repeat=frames - 1):
        starts = [0] + [t + 1 for t, cut in enumerate(cuts) if cut]
        ends = [s - 1 for s in starts[1:]] + [frames - 1]
        best = max(best, sum((e - s) * len(static_places(s, e)) for s, e in zip(starts, ends, strict=True)))
    return best


def dpc_reference(vectors, clusters, neighbours):
    """Density peaks, ties by index: (centres, {member: its nearest centre})."""
    n, dim = len(vectors), len(vectors[0])
    dist = [[math.dist(vectors[a], vectors[b]) / math.sqrt(dim) for b in range(n)] for a in range(n)]
    rho = [math.exp(-sum(sorted(d * d for d in dist[a])[:neighbours]) / neighbours) for a in range(n)]
    largest = max(max(row) for row in dist)
    delta = []
    for a in range(n):
        denser = [dist[a][b] for b in range(n) if rho[b] > rho[a] or (rho[b] == rho[a] and b < a)]
        delta.append(min(denser) if denser else largest)
    centres = sorted(range(n), key=lambda a: (-rho[a] * delta[a], a))[:clusters]
    members = {a: min(centres, key=lambda c: (dist[a][c], centres.index(c))) for a in range(n) if a not in centres}
    return centres, members


def holitom_clip_reference(x, saliency, count):
    """(kept indices, {anchor index: merged vector}) of the stage before layer 0, from the formulas."""
    tokens = x.double().view(FRAMES, PLACES, -1)
    rows = tokens.tolist()
    sim = [[cos(rows[t][j], rows[t + 1][j]) for j in range(PLACES)] for t in range(FRAMES - 1)]

    def static_places(s, e):
        return [j for j in range(PLACES) if all(sim[t][j] > 0.8 for t in range(s, e))] if e > s else []

    windows, saved = official_windows(static_places, FRAMES)
    assert saved == most_saved_by_any_cut(static_places, FRAMES)  # the programme finds the best cut

    def window_saving(w):
        return (w[1] - w[0]) * len(static_places(*w))

    while sum(map(window_saving, windows)) > FRAMES * PLACES - count:  # give up the least saving windows
        worst = min((w for w in windows if w[1] > w[0]), key=lambda w: (window_saving(w), -w[0]))
        at = windows.index(worst)
        windows[at : at + 1] = [(t, t) for t in range(worst[0], worst[1] + 1)]
    units = []  # (kind, window, frame, places)
    for s, e in windows:
        static = static_places(s, e)
        if static:
            units.append(("static", (s, e), None, static))
        units += [("dynamic", (s, e), t, [j for j in range(PLACES) if j not in static]) for t in range(s, e + 1)]
    total = sum(len(u[3]) for u in units)
    quotas = [count * len(u[3]) / total for u in units]
    shares = [int(q) for q in quotas]
    for i in sorted(range(len(units)), key=lambda i: (-(quotas[i] - shares[i]), i))[: count - sum(shares)]:
        shares[i] += 1
    kept, merged = [], {}
    for (kind, (s, e), frame, places), share in zip(units, shares, strict=True):
        if kind == "dynamic":
            ranked = sorted(places, key=lambda j: (-float(saliency[frame * PLACES + j]), j))
            kept += [frame * PLACES + j for j in ranked[:share]]
        elif share:
            averaged = [tokens[s : e + 1, j].mean(0) for j in places]
            centres, members = dpc_reference([a.tolist() for a in averaged], share, min(7, share))
            for c in centres:
                joined = [averaged[m] for m, centre in members.items() if centre == c]
                mix = 0.6 * averaged[c] + 0.4 * torch.stack(joined).mean(0) if joined else averaged[c]
                merged[s * PLACES + places[c]] = mix
    return sorted(kept), merged


def group_means(x, selection):
    """{anchor: the weighted mean of its group's sources}, in float64."""
    if not selection.merge_anchor.numel():
        return {}
    weight, sources = selection.merge_weight.double(), x.double()[selection.merge_source]
    means = {}
    for group, anchor in enumerate(selection.merge_anchor.tolist()):
        chosen = selection.merge_target == group
        means[anchor] = (sources[chosen] * weight[chosen, None]).sum(0) / weight[chosen].sum()
    return means


def clip_with_still_places(pattern, seed):
    """Tokens that stay put (a fixed vector plus noise, 0.2 unless said) at some places through some
    frames, and are drawn afresh everywhere else."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(FRAMES, PLACES, DIM, generator=g)
    for frames, places, *noise in pattern:
        fixed = torch.randn(len(places), DIM, generator=g)
        for t in frames:
            x[t, places] = fixed + (noise or [0.2])[0] * torch.randn(len(places), DIM, generator=g)
    return x.view(FRAMES * PLACES, DIM), torch.rand(FRAMES * PLACES, generator=g)


PATTERNS = {
    "two scenes": [(range(0, 4), range(0, 10)), (range(4, 8), range(6, 15))],
    "a still background": [(range(8), range(3, 12))],
    "nested": [(range(8), range(0, 4)), (range(1, 6), range(4, 12)), (range(6, 8), range(12, 17))],
    "all still": [(range(8), range(17))],
    "nothing still": [],
    # Windows 0-3 and 4-7 save 15 tokens each: the later one is given up first.
    "equal scenes": [(range(0, 4), range(0, 5)), (range(4, 8), range(8, 13))],
    # Frames 0-1 alone and 0-2 save 4 each: the programme keeps the shorter window.
    "a tie": [(range(0, 2), range(0, 4)), (range(0, 3), range(0, 2)), (range(3, 8), range(10, 15))],
    # Noise that puts adjacent similarities around tau = 0.8 (1 / (1 + 0.47^2) = 0.82).
    "around tau": [(range(8), range(17), 0.47)],
}


def check_stage_before_the_llm(method, x, saliency, budget, count, reference, label):
    """The method's stage before layer 0 on a 8 x 17 clip: exactly `count` tokens in clip order, the
    reference's kept tokens, its merged tokens at the same anchors with the same values, deterministic."""
    stage = stage_input(x, FRAMES, PLACES, budget, saliency=saliency)
    selection = method.select(stage)
    assert selection.size == count and selection.in_clip_order, label
    kept, merged = reference(x, saliency, count)
    assert selection.keep.tolist() == kept, label
    ours = group_means(x, selection)
    assert sorted(ours) == sorted(merged), label
    for anchor, mean in ours.items():
        torch.testing.assert_close(mean, merged[anchor], atol=1e-6, rtol=1e-6)
    again = method.select(stage)
    assert torch.equal(again.keep, selection.keep) and torch.equal(again.merge_source, selection.merge_source)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_holitom_before_the_llm_keeps_and_merges_what_the_formulas_say(pattern):
    x, saliency = clip_with_still_places(PATTERNS[pattern], seed=len(pattern))
    for budget in (1, 3, 8, 15, 25, 40, 55, 58, 60, 67, 68, 100, FRAMES * PLACES - 1):
        count = min(FRAMES * PLACES, 2 * budget)  # the inner stage halves
        check_stage_before_the_llm(HoliTom(), x, saliency, budget, count, holitom_clip_reference, (pattern, budget))


def official_inner_merge(hidden, scores, budget):
    """`Qwen2Model_holitom.forward` at layer HOLITOM_k, transcribed: the top tokens by attention stay;
    every other one, in order, is averaged into its most cosine-similar kept token, in place."""
    states = hidden.double().clone()
    top = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:budget]
    others = [i for i in range(len(scores)) if i not in top]
    best = {i: max(top, key=lambda k: (cos(states[i].tolist(), states[k].tolist()), -top.index(k))) for i in others}
    for i in others:
        states[best[i]] = (states[best[i]] + states[i]) / 2
    return {k: states[k] for k in top}


def test_holitom_inside_the_llm_merges_as_the_official_loop_does():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(40, DIM, generator=g)
    hidden[20:] = hidden[:20] + 0.3 * torch.randn(20, DIM, generator=g)  # near twins: several joins per token
    hidden[3], hidden[17] = 2 * hidden[9], 4 * hidden[9]  # exact cosine ties: the most attended kept token wins
    scores = torch.rand(40, generator=g) * 0.9
    scores[3], scores[9], scores[17] = 0.95, 0.96, 0.97
    frames = torch.arange(40) // 5
    for budget in (1, 5, 20, 39, 40):
        selection = merge_into_kept(hidden, scores, frames, budget)
        expected = official_inner_merge(hidden, scores, budget)
        assert selection.size == budget and selection.keep.numel() == 0
        assert selection.merge_anchor.tolist() == sorted(expected)
        for anchor, mean in group_means(hidden, selection).items():
            torch.testing.assert_close(mean, expected[anchor], atol=1e-6, rtol=1e-6)
    stage = stage_input(hidden, 8, 5, 12, layer=10, attention=scores[None], rows=frames * 0, cols=frames * 0)
    inner = HoliTom().select(stage)  # a stage after a layer is the inner merge
    assert torch.equal(inner.merge_anchor, merge_into_kept(hidden, scores, frames, 12).merge_anchor)


def test_holitom_stages_follow_the_authors_depth():
    assert HoliTom().default_stages(28) == [-1, 17]  # HOLITOM_k = 18 of Qwen2-7B's 28 layers
    assert HoliTom().default_stages(32) == [-1, 20]
    assert HoliTom().default_stages(4) == [-1, 2]
