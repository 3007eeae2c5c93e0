"""FlashVID against a slow reference written from its formulas and the official code
(Fanziyang-v/FlashVID `flashvid/utils.py`, `flashvid/token_selection.py`), in float64 and plain
Python, with the exact-budget rules its module docstring states."""

from __future__ import annotations

import math

import pytest
import torch

from tests.references.test_peer_holitom import check_stage_before_the_llm, cos, dpc_reference
from tests.references.test_peers import stage_input
from vidsparse.pruning.flashvid import FlashVID

FRAMES, PLACES, DIM = 8, 17, 32


def hamilton(total, weights):
    quotas = [total * w / sum(weights) for w in weights]
    shares = [int(q) for q in quotas]
    for i in sorted(range(len(weights)), key=lambda i: (-(quotas[i] - shares[i]), i))[: total - sum(shares)]:
        shares[i] += 1
    return shares


def flashvid_clip_reference(x, saliency, count):
    """(kept indices, {anchor index: merged vector}) of the stage before layer 0."""
    if count >= FRAMES * PLACES:
        return list(range(count)), {}
    tokens = x.double().view(FRAMES, PLACES, -1)
    rows = tokens.tolist()
    sal = saliency.double().view(FRAMES, PLACES).tolist()
    means = [tokens[t].mean(0).tolist() for t in range(FRAMES)]
    sims = [cos(means[t], means[t + 1]) for t in range(FRAMES - 1)]
    cuts = {t for t in range(FRAMES - 1) if sims[t] < 0.9}
    more = max(1, FRAMES // 4) - 1 - len(cuts)
    cuts |= set(sorted((t for t in range(FRAMES - 1) if t not in cuts), key=lambda t: (sims[t], t))[: max(0, more)])
    segments, start = [], 0
    for t in sorted(cuts) + [FRAMES - 1]:
        segments.append(list(range(start, t + 1)))
        start = t + 1
    shares = hamilton(count, [PLACES] * FRAMES)
    picks = [min(k, math.ceil(0.7 * k)) for k in shares]
    kept, merged = [], {}
    picked = {}
    for segment in segments:
        centre = tokens[segment[0] : segment[-1] + 1].mean((0, 1)).tolist()
        for t in segment:  # ADTS, attn_div_v2
            scale = [sal[t][j] * sum(p * q for p, q in zip(rows[t][j], centre, strict=True)) for j in range(PLACES)]
            dist = [[(1 - cos(rows[t][i], rows[t][j])) * scale[j] for j in range(PLACES)] for i in range(PLACES)]
            second = [sorted(dist[i][j] for i in range(PLACES))[1] for j in range(PLACES)]
            chosen = [max(range(PLACES), key=lambda j: (second[j], -j))][: picks[t]]
            while len(chosen) < picks[t]:
                chosen.append(max((j for j in range(PLACES) if j not in chosen),
                                  key=lambda j: (min(dist[i][j] for i in chosen), -j)))
            picked[t] = set(chosen)
            kept += [t * PLACES + j for j in chosen]
        # Trees across time: links above 0.8, the most similar first, at most (others - rest) merges.
        rest = sum(shares[t] - picks[t] for t in segment)
        others = sum(PLACES - picks[t] for t in segment)
        links = []
        for t in segment[1:]:
            for j in range(PLACES):
                if j in picked[t]:
                    continue
                i = max((i for i in range(PLACES) if i not in picked[t - 1]),
                        key=lambda i: (cos(rows[t][j], rows[t - 1][i]), -i))
                if cos(rows[t][j], rows[t - 1][i]) > 0.8:
                    links.append((cos(rows[t][j], rows[t - 1][i]), t, j, i))
        links = sorted(links, key=lambda link: (-link[0], link[1], link[2]))[: max(0, others - rest)]
        parent = {(t, j): (t - 1, i) for _, t, j, i in links}
        trees = {}
        for t in segment:
            for j in range(PLACES):
                if j not in picked[t]:
                    root = (t, j)
                    while root in parent:
                        root = parent[root]
                    trees.setdefault(root, []).append(t * PLACES + j)
        if not rest:
            continue
        roots_in = {t: sorted(j for (f, j) in trees if f == t) for t in segment}
        for t, clusters in zip(segment, hamilton(rest, [len(roots_in[t]) for t in segment]), strict=True):
            if not clusters:
                continue
            means_of_trees = [x.double()[trees[(t, j)]].mean(0) for j in roots_in[t]]
            centres, members = dpc_reference([m.tolist() for m in means_of_trees], clusters, min(7, clusters))
            for c in centres:
                joined = [c] + [m for m, centre_of in members.items() if centre_of == c]
                merged[t * PLACES + roots_in[t][c]] = torch.stack([means_of_trees[m] for m in joined]).mean(0)
    return sorted(kept), merged


def scenes_clip(scene_of_frame, still, seed):
    """Each frame's tokens around its scene's vector (so that frames of one scene have near-equal mean
    tokens, while tokens differ); `still` places stay put (small noise) through all frames of a scene."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randn(max(scene_of_frame) + 1, DIM, generator=g)
    x = offsets[torch.tensor(scene_of_frame)][:, None, :] + torch.randn(FRAMES, PLACES, DIM, generator=g)
    fixed = torch.randn(max(scene_of_frame) + 1, len(still), DIM, generator=g)
    for t, scene in enumerate(scene_of_frame):
        x[t, still] = offsets[scene] + fixed[scene] + 0.2 * torch.randn(len(still), DIM, generator=g)
    return x.view(FRAMES * PLACES, DIM), torch.rand(FRAMES * PLACES, generator=g)


CLIPS = {
    "two scenes": ([0, 0, 0, 0, 1, 1, 1, 1], list(range(2, 12))),
    "one scene": ([0] * 8, list(range(0, 17, 2))),
    "every frame new": (list(range(8)), list(range(5))),
}


@pytest.mark.parametrize("clip", list(CLIPS))
def test_flashvid_before_the_llm_keeps_and_merges_what_the_formulas_say(clip):
    x, saliency = scenes_clip(*CLIPS[clip], seed=len(clip))
    for budget in (1, 3, 8, 15, 22, 30, 40, 41):
        count = min(FRAMES * PLACES, round(budget / 0.3))
        check_stage_before_the_llm(FlashVID(), x, saliency, budget, count, flashvid_clip_reference, (clip, budget))


def test_flashvid_inside_the_llm_keeps_what_the_last_token_attends_to_most():
    attention = torch.rand(1, 60, generator=torch.Generator().manual_seed(0))
    flat = torch.zeros(60, dtype=torch.long)
    inner = FlashVID().select(stage_input(torch.zeros(60, 4), 4, 15, 9, layer=5, attention=attention, rows=flat,
                                          cols=flat))
    assert inner.keep.tolist() == sorted(torch.topk(attention[0], 9).indices.tolist())
    assert FlashVID().default_stages(28) == [-1, 19]  # pruning_layer 20 of Qwen2-7B's 28 reads layer 19
    assert FlashVID().default_stages(32) == [-1, 22]
