"""Visual-key dropout in training equals removing the dropped tokens: a forward with the hooks set
gives, at every token not dropped, the logits of a layer-by-layer forward in which the dropped tokens
are cut out of the sequence (kept tokens at their own positions)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lab import train_demo
from lab.demo_eval import Encoder
from lab.key_dropout import LATER_LAYER, KeyDropout, draw_drops
from tests.lab.test_train_demo import TINY


def _removed(model, embeds: torch.Tensor, first: torch.Tensor, later: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one sample (L, d) with ``first`` cut out before layer 0 and ``later`` before layer
    LATER_LAYER, and the positions they are at."""
    lm = model.model.language_model
    keep = ~first
    h, pos = embeds[keep][None], torch.arange(embeds.shape[0])[keep][None]
    for i, layer in enumerate(lm.layers):
        if i == LATER_LAYER:
            still = ~later[keep]
            keep = keep & ~later
            h, pos = h[:, still], pos[:, still]
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
    return model.lm_head(lm.norm(h))[0], pos[0]


@pytest.mark.parametrize("padding_mask", [False, True])
def test_masked_keys_equal_removed_tokens(padding_mask):
    torch.manual_seed(0)
    y = dataclasses.replace(TINY, padding_mask=padding_mask)
    tok, model = train_demo.build(y, torch.device("cpu"))
    model.eval()
    y = dataclasses.replace(y, qa_tasks={"count": 0.5, "moving": 0.5})
    batch, targets = train_demo.qa_batch(y, Encoder(tok, model.config.video_seq_length),
                                         np.random.default_rng(4), 4, 4, torch.device("cpu"))
    visual = targets["visual"]
    first, later = draw_drops(visual, np.random.default_rng(5), share=1.0, min_keep=0.1)
    assert later.any() and first.any() and not (first & later).any() and not ((first | later) & ~visual).any()
    dropout = KeyDropout(model)
    with torch.no_grad():
        embeds = model(**batch, output_hidden_states=True).hidden_states[0]
        dropout.set(first, later)
        dropped = model(**batch).logits
        dropout.set(None)
        again = model(**batch).logits
    dropout.close()
    for b in range(visual.shape[0]):
        expected, pos = _removed(model, embeds[b], first[b], later[b])
        real = batch["input_ids"][b, pos] != tok.pad_token_id  # a padded query's own row differs under a padding mask
        torch.testing.assert_close(dropped[b, pos][real], expected[real], rtol=1e-4, atol=1e-4)
    full = model(**batch).logits
    torch.testing.assert_close(again, full)  # unset: the model as before
    assert not torch.allclose(dropped[0, -1], full[0, -1], atol=1e-4)  # the drops change the answer's logits


def test_drops_are_random_shares_of_the_visual_tokens():
    visual = torch.zeros(200, 30, dtype=torch.bool)
    visual[:, 3:23] = True
    first, later = draw_drops(visual, np.random.default_rng(1), share=0.5, min_keep=0.25)
    again = draw_drops(visual, np.random.default_rng(1), share=0.5, min_keep=0.25)
    assert torch.equal(first, again[0]) and torch.equal(later, again[1])
    hit = first.any(1) | later.any(1)
    assert 0.4 < hit.float().mean() < 0.6
    kept = (visual & ~first & ~later).sum(1)[hit].float() / 20
    assert kept.min() >= 0.25 - 1e-6 and kept.max() <= 1.0
    assert 0.3 < later.any(1)[hit].float().mean() < 0.7
    assert not ((first | later) & ~visual).any()


def test_later_keep_drops_every_hit_sample_to_its_range():
    visual = torch.zeros(300, 130, dtype=torch.bool)
    visual[:, 5:125] = True
    first, later = draw_drops(visual, np.random.default_rng(2), share=0.6, min_keep=0.2, later_keep=(0.05, 0.3))
    hit = first.any(1) | later.any(1)
    assert 0.5 < hit.float().mean() < 0.7
    early = (visual & ~first).sum(1)[hit].float() / 120
    late = (visual & ~first & ~later).sum(1)[hit].float() / 120
    assert early.min() >= 0.2 - 1e-6 and (late <= early).all()
    assert late.min() >= 0.05 - 1 / 120 and late.max() <= 0.3 + 1 / 120
    assert (late < early).float().mean() > 0.95  # nearly every hit sample loses more from layer 2 on
    assert late.std() > 0.05  # a spread of shares, not one
    assert not (first & later).any() and not ((first | later) & ~visual).any()
