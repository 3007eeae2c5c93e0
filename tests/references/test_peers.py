"""The video peers (VidCom², FastVID, DyCoke) against slow references written from their papers'
and official code's formulas (../shared/PEERS.md), in float64 and plain Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from vidsparse.models.visual import ClipGrid
from vidsparse.pruning.base import StageInput


def stage_input(x, frames_count, per_frame, budget, layer=-1, attention=None, rows=None, cols=None, **extra):
    n = x.shape[0]
    frames = torch.arange(frames_count).repeat_interleave(per_frame)
    patch = torch.arange(n) % per_frame - 1
    grid = int(math.isqrt(per_frame - 1))
    return StageInput(index=0, num_stages=1, layer=layer, num_visual=n, budget=budget, hidden=x, frames=frames,
                      rows=torch.where(patch < 0, -1, patch // grid) if rows is None else rows,
                      cols=torch.where(patch < 0, -1, patch % grid) if cols is None else cols,
                      attention=attention, min_per_frame=0, generator=torch.Generator(),
                      grid=ClipGrid(frames_count, grid, grid, True), **extra)


def clip_features(frames_count=8, per_frame=17, dim=48, seed=0):
    """Tokens with frame-level structure: a shared background, per-frame drift, a few distinct tokens."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=g)
    drift = torch.randn(frames_count, dim, generator=g) * torch.linspace(0.1, 2.0, frames_count)[:, None]
    x = base + drift.repeat_interleave(per_frame, 0) + 0.5 * torch.randn(frames_count * per_frame, dim, generator=g)
    return x


# ---------------------------------------------------------------- VidCom²
def vidcom2_scores_reference(x, frames_count, per_frame):
    """(s, u): each token's score, each frame's uniqueness."""
    rows = x.double().tolist()
    dim = len(rows[0])
    n = len(rows)
    means = [sum(r[c] for r in rows) / n for c in range(dim)]
    variance = [sum((r[c] - means[c]) ** 2 for r in rows) / n for c in range(dim)]
    channels = sorted(range(dim), key=lambda c: (variance[c], c))[: max(1, int(dim * 0.5))]
    tokens = []
    for r in rows:
        v = [r[c] for c in channels]
        norm = math.sqrt(sum(a * a for a in v))
        tokens.append([a / norm for a in v])
    k = len(channels)
    video = [sum(t[c] for t in tokens) / n for c in range(k)]
    frame_centre = [[sum(tokens[f * per_frame + i][c] for i in range(per_frame)) / per_frame for c in range(k)]
                    for f in range(frames_count)]

    def kernel(a, b):
        d2 = sum((p - q) ** 2 for p, q in zip(a, b, strict=True))
        return sum(math.exp(-d2 / (2 * alpha)) for alpha in (1 / 8, 1 / 4, 1 / 2, 1, 2))

    v = [kernel(tokens[j], video) for j in range(n)]
    f = [kernel(tokens[j], frame_centre[j // per_frame]) for j in range(n)]
    s = [a + b for a, b in zip(v, f, strict=True)]
    u = [-sum(v[t * per_frame : (t + 1) * per_frame]) / per_frame for t in range(frames_count)]
    return s, u


def vidcom2_reference(s, u, frames_count, per_frame, budget):
    n = len(s)
    top = max(u)
    e = [math.exp((a - top) / 0.01) for a in u]
    p = [a / sum(e) for a in e]
    r = budget / n
    counts = [max(1, round(min(1.0, r * (1 + pt - sum(p) / len(p))) * per_frame)) for pt in p]
    kept = set()
    for t in range(frames_count):
        frame = sorted(range(t * per_frame, (t + 1) * per_frame), key=lambda j: (s[j], j))
        kept |= set(frame[: counts[t]])
    while len(kept) > budget:
        kept.remove(max(kept, key=lambda j: (s[j], j)))
    while len(kept) < budget:
        kept.add(min((j for j in range(n) if j not in kept), key=lambda j: (s[j], j)))
    return sorted(kept)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_vidcom2_keeps_what_the_formulas_keep_at_every_budget(seed):
    from vidsparse.pruning.vidcom2 import VidCom2

    x = clip_features(seed=seed)
    scores, uniqueness = vidcom2_scores_reference(x, 8, 17)
    for budget in range(1, 8 * 17 + 1):
        kept = VidCom2().select(stage_input(x, 8, 17, budget)).keep
        assert kept.tolist() == vidcom2_reference(scores, uniqueness, 8, 17, budget), budget
        assert torch.equal(kept, VidCom2().select(stage_input(x, 8, 17, budget)).keep)  # deterministic


# ---------------------------------------------------------------- DyCoke
def dycoke_ttm_reference(x, frames_count, per_frame, budget):
    rows = x.double().view(frames_count, per_frame, -1).tolist()
    pairs = [(i, i + 1) for i in range(0, frames_count - 1, 2)] + [(i, i + 2) for i in range(0, frames_count - 4, 4)]
    pruned = {b for _, b in pairs}
    whole = (frames_count - len(pruned)) * per_frame
    default = whole + len(pruned) * int(0.3 * per_frame)
    keep = min(per_frame, max(1, math.ceil((max(budget, default) - whole) / len(pruned))))

    def cos(a, b):
        return sum(p * q for p, q in zip(a, b, strict=True)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))

    kept = {f * per_frame + j for f in range(frames_count) if f not in pruned for j in range(per_frame)}
    for a, b in pairs:
        ranked = sorted(range(per_frame), key=lambda j: (cos(rows[a][j], rows[b][j]), j))
        kept |= {b * per_frame + j for j in ranked[:keep]}
    return sorted(kept)


def test_dycoke_merging_keeps_what_the_official_loops_keep():
    from vidsparse.pruning.dycoke import DyCoke, DyCokePrefill

    x = clip_features(seed=3)
    for method in (DyCoke, DyCokePrefill):
        for budget in (1, 20, 56, 60, 80, 120, 135):
            kept = method().select(stage_input(x, 8, 17, budget)).keep
            assert kept.tolist() == dycoke_ttm_reference(x, 8, 17, budget), budget
            assert kept.numel() >= min(budget, 3 * 17 + 5)  # never fewer than the later choice needs
            assert torch.equal(kept, method().select(stage_input(x, 8, 17, budget)).keep)  # deterministic
    # DyCoke's l = 3 reads layer l - 1: while decoding, or (the stand-in) in the prefill.
    assert (DyCoke().default_stages(32), DyCoke().decoding_layer(32)) == ([-1], 2)
    assert (DyCokePrefill().default_stages(32), DyCokePrefill().decoding_layer(32)) == ([-1, 2], None)
    # The stand-in's second stage: the B tokens the last prompt token attends to most.
    attention = torch.rand(1, 60, generator=torch.Generator().manual_seed(0))
    flat = torch.zeros(60, dtype=torch.long)
    second = DyCokePrefill().select(stage_input(torch.zeros(60, 4), 4, 15, 9, layer=2, attention=attention,
                                                rows=flat, cols=flat))
    assert second.keep.tolist() == sorted(torch.topk(attention[0], 9).indices.tolist())


def dycoke_keys_reference(budget: int, frames: list[int], min_per_frame: int = 0, still: float = 0.9):
    """DyCoke's decoding-time choice, written from the official `dycoke_pruning` / `update_cache` in
    float64 Python: a token whose attention is at least `still` (0.9) cosine-similar to the previous
    token's sees every key; any other sees its `budget` most attended (ties: the earlier), each frame's
    `min_per_frame` most attended first (vidsparse's floor)."""

    def choose(attention: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        values = attention.double().tolist()
        if previous is not None:
            before = previous.double().tolist()
            dot = sum(a * b for a, b in zip(values, before, strict=True))
            norms = sum(a * a for a in values) ** 0.5 * sum(b * b for b in before) ** 0.5
            if dot / norms >= still:
                return torch.ones(len(values), dtype=torch.bool)
        ranked = sorted(range(len(values)), key=lambda i: (-values[i], i))
        floor = [i for i in ranked if sum(frames[j] == frames[i] for j in ranked[: ranked.index(i)]) < min_per_frame]
        chosen = (floor + [i for i in ranked if i not in floor])[:budget]
        return torch.zeros(len(values), dtype=torch.bool).index_fill_(0, torch.tensor(chosen), True)

    return choose


def test_dycoke_decoding_choice_is_the_official_rule():
    """Every similarity to the token before around the 0.9 threshold, ties, a batch of questions, and
    the first step (no step before it): each row's keys are those of the slow reference, and the
    memory handed back is the step's attention."""
    from vidsparse.pruning.base import DecodingStep
    from vidsparse.pruning.dycoke import DyCoke

    generator = torch.Generator().manual_seed(0)
    n, budget = 40, 9
    previous = torch.rand(n, generator=generator, dtype=torch.float64)
    unit = previous / previous.norm()
    other = torch.rand(n, generator=generator, dtype=torch.float64)
    other = other - (other @ unit) * unit
    other = other / other.norm()
    rows = [cosine * unit + math.sqrt(1 - cosine**2) * other for cosine in (0.3, 0.85, 0.899, 0.901, 0.95, 1.0)]
    rows.append((previous * 4).round() / 4 - 0.5)  # ties (several at each value) and a cosine far from 0.9
    attention = torch.stack(rows).float()
    before = previous.float().expand(len(rows), -1)
    frames = torch.arange(n) // 10  # 4 frames of 10 keys
    for floor in (0, 2):
        reference = dycoke_keys_reference(budget, frames.tolist(), floor)
        for prior in (before, None):
            seen, memory = DyCoke().select_while_decoding(DecodingStep(attention, budget, prior, frames, floor))
            for row in range(len(rows)):
                expected = reference(attention[row], None if prior is None else prior[row])
                assert torch.equal(seen[row], expected), (floor, prior is None, row)
                if floor and not expected.all():
                    assert torch.bincount(frames[expected]).min() >= floor
            assert torch.equal(memory, attention)
    seen, _ = DyCoke().select_while_decoding(DecodingStep(attention, budget, before, frames, 0))
    assert seen.sum(-1).tolist() == [budget, budget, budget, n, n, n, budget]  # 0.9 is the line


# ---------------------------------------------------------------- FastVID
def fastvid_reference(x, saliency, frame_features, frames_count, per_frame, budget):
    """(kept indices, {anchor index: merged vector}) from FastVID's formulas, float64 loops."""
    f = frame_features.double().tolist()
    xs = x.double()
    rows = xs.tolist()

    def cos(a, b):
        return sum(p * q for p, q in zip(a, b, strict=True)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))

    sims = [cos(f[t], f[t + 1]) for t in range(frames_count - 1)]
    c = max(1, frames_count // 4)
    cuts = set(sorted(range(frames_count - 1), key=lambda t: (sims[t], t))[: c - 1]) | {
        t for t in range(frames_count - 1) if sims[t] < 0.9}
    segments, start = [], 0
    for t in sorted(cuts) + [frames_count - 1]:
        segments.append(list(range(start, t + 1)))
        start = t + 1
    # Hamilton apportionment of the budget by token count.
    quotas = [budget * len(s) / frames_count for s in segments]
    shares = [int(q) for q in quotas]
    for i in sorted(range(len(segments)), key=lambda i: (-(quotas[i] - shares[i]), i))[: budget - sum(shares)]:
        shares[i] += 1
    kept, merged = set(), {}
    for segment, share in zip(segments, shares, strict=True):
        length = len(segment)
        anchor_frames = [j for j in range(length) if (length - 1 - j) % 4 == 0]
        context = int(share * 0.4)
        salient = [(share - context) // length + (j < (share - context) % length) for j in range(length)]
        contexts = [0] * length
        for rank, j in enumerate(sorted(anchor_frames, reverse=True)):
            contexts[j] = context // len(anchor_frames) + (rank < context % len(anchor_frames))
        spill = 0
        for j in anchor_frames:
            over = max(0, contexts[j] - (per_frame - salient[j]))
            contexts[j] -= over
            spill += over
        for j in range(length):
            add = min(per_frame - salient[j] - contexts[j], spill)
            salient[j] += add
            spill -= add
        chosen = {}
        for j, frame in enumerate(segment):
            tokens = range(frame * per_frame, (frame + 1) * per_frame)
            ranked = sorted(tokens, key=lambda i: (i != frame * per_frame, -float(saliency[i]), i))
            chosen[frame] = set(ranked[: salient[j]])
            kept |= chosen[frame]
        others = [i for frame in segment for i in range(frame * per_frame, (frame + 1) * per_frame)
                  if i not in chosen[frame]]
        for j, frame in enumerate(segment):
            if not contexts[j]:
                continue
            pool = [i for i in range(frame * per_frame, (frame + 1) * per_frame) if i not in chosen[frame]]
            dist = {(a, b): math.dist(rows[a], rows[b]) / math.sqrt(len(rows[a])) for a in pool for b in pool}
            rho = {a: math.exp(-sum(sorted(dist[a, b] ** 2 for b in pool)[: min(4, len(pool))])
                               / min(4, len(pool))) for a in pool}
            delta = {}
            for a in pool:
                denser = [dist[a, b] for b in pool if rho[b] > rho[a] or (rho[b] == rho[a] and b < a)]
                delta[a] = min(denser) if denser else max(dist.values())
            anchors = sorted(pool, key=lambda a: (-rho[a] * delta[a], pool.index(a)))[: contexts[j]]
            members = {a: [] for a in anchors}
            for i in others:
                best = max(anchors, key=lambda a: (cos(rows[i], rows[a]), -anchors.index(a)))
                members[best].append(i)
            for a in anchors:
                w = max(1 / (len(members[a]) + 1), 0.6)
                mean = xs[members[a]].mean(0) if members[a] else xs[a]
                merged[a] = w * xs[a] + (1 - w) * mean
    return sorted(kept), merged


def test_fastvid_keeps_and_merges_what_the_formulas_say():
    from vidsparse.pruning.fastvid import FastVID

    frames_count, per_frame = 8, 17
    x = clip_features(frames_count, per_frame, seed=5)
    g = torch.Generator().manual_seed(6)
    saliency = torch.rand(frames_count * per_frame, generator=g)
    scene = torch.randn(3, 32, generator=g)
    noise = 0.05 * torch.randn(8, 32, generator=g)
    milder = scene[0] + 0.8 * scene[1]  # cos 0.84 to scene 0 (with the noise)
    milder_still = milder + 1.2 * scene[2]  # cos 0.85 to `milder`
    patterns = {
        # 0-2, 3-5, 6-7 alike: two cuts under tau, plus the c - 1 = 1 least similar pair.
        "three scenes": scene[torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])] + noise,
        # One scene change: the c - 1 rule adds a cut; the 6-frame segment has two anchor frames.
        "one change": scene[torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])] + noise,
        # No change: one cut, by the c - 1 rule alone.
        "still": scene[0] + noise,
        # Two milder changes (cos 0.84-0.85): the c - 1 rule cuts one, tau = 0.9 the other.
        "milder changes": torch.stack([scene[0]] * 3 + [milder] * 3 + [milder_still] * 2) + noise,
    }
    for name, frame_features in patterns.items():
        for budget in (1, 3, 8, 14, 34, 68, 120, frames_count * per_frame - 1):
            stage = stage_input(x, frames_count, per_frame, budget, saliency=saliency, frame_features=frame_features)
            selection = FastVID().select(stage)
            assert selection.size == budget and selection.in_clip_order
            kept, merged = fastvid_reference(x, saliency, frame_features, frames_count, per_frame, budget)
            assert selection.keep.tolist() == kept, (name, budget)
            assert sorted(selection.merge_anchor.tolist()) == sorted(merged), (name, budget)
            again = FastVID().select(stage)  # deterministic
            assert torch.equal(again.keep, selection.keep) and torch.equal(again.merge_source, selection.merge_source)
            if not merged:
                continue
            weight = selection.merge_weight.double()
            for group, anchor in enumerate(selection.merge_anchor.tolist()):
                chosen = selection.merge_target == group
                ours = (x.double()[selection.merge_source[chosen]] * weight[chosen, None]).sum(0) / weight[chosen].sum()
                torch.testing.assert_close(ours, merged[anchor], atol=1e-6, rtol=1e-6)


def test_saliency_equals_the_towers_eager_attention(tiny_checkpoint, clips):
    from transformers import VideoLlavaForConditionalGeneration

    from vidsparse.models.video_llava import VideoLlava
    from vidsparse.preprocess import preprocess_frames
    from vidsparse.video import decode_video

    model = VideoLlava.from_pretrained(str(tiny_checkpoint))
    pixels = preprocess_frames(decode_video(clips["h264"], 8).frames, model.image_size)
    with torch.inference_mode():
        features = model.video_features(pixels, saliency=True)
    eager = VideoLlavaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), attn_implementation="eager")
    with torch.no_grad():
        out = eager.model.video_tower(pixels, output_attentions=True, output_hidden_states=True)
    layer = eager.config.vision_feature_layer % len(out.hidden_states)
    torch.testing.assert_close(features.cls_attention, out.attentions[layer - 1][:, :, 0].mean(1), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(features.frame_embedding,
                               eager.model.video_tower.post_layernorm(out.hidden_states[layer][:, 0]), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(features.tokens, model.video_features(pixels).tokens)
