"""An auxiliary training loss that bootstraps the colour/shape lookup of the ShapesQA-HD model.

Why: in "what color is the square ? ASSISTANT :" the first answer token is predicted at ":", four
tokens after the asked word. Answering needs two steps -- carry "square" forward to ":", then
attend from ":" to the square's patches -- and neither step lowers the loss until the other exists,
so plain training plateaued at chance on 520 visual tokens (HD recipe C: colour 0.47, shape 0.23
after 750 steps, while the asked word placed right before the answer was looked up 0.97 of the
time). This loss rewards the second step directly: at the last prompt position, one head of one
early layer is pushed to put its attention over the video on the asked object's patches
(``-log`` of that share). It is faded out during training, so the finished model is judged on the
answer loss alone.

Looking the object up was not enough: with a third of that head's attention on the asked object
(pointer loss ~1.0 after 250 steps) answers stayed at chance, while a linear probe read the colour
from the object's patches at every layer input (1.00) but from the head's output only 0.44 of the
time (the rest of its attention is on the other objects). A throwaway classifier trained on that
head's output did not fix it either (0.48 after 125 steps).

The copy pointer: with early answers (``Yardstick.early_answer``) the asked word's own position
learns the lookup in ~100 steps (colour at the asked word 1.00, at the answer position 0.40), which
leaves copying it forward; a second PointerLoss, at a later layer, pushes one head at the answer
position onto the asked word. With both, colour questions went from 0.55 to 1.00 in 375 steps;
shape questions not (0.18-0.40).

The word pointer: the shape word had found its object by itself (layer 0, one head, 0.97 of its
video attention), the colour word had not (0.17 at best). The pointer loss from the asked word's own
position at layer 0 made one head put 0.71 of its video attention on the asked object in 100 steps
(0.82 after 175); a linear probe then read the shape from the residual after layer 0 at the word
0.92 of the time, but the word's answer stayed at chance (0.31) on the usual task mix -- the readout
learns only from shape questions: trained on shape questions alone it went 0.33 -> 0.63 in 50 steps.
Recipe J (the word pointer at layer 0 from the start, shape questions the largest share) from scratch:
colour 0.87 and shape 1.00 on the monitoring clips at QA step 500.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vidsparse.datasets.shapes import COLOR_NAMES, SHAPES


def asked_word(qtype: str, question: str) -> str | None:
    """The word naming the object a colour/shape question asks about (None for other types)."""
    names = {"color": SHAPES, "shape": COLOR_NAMES}.get(qtype)
    return None if names is None else next(w for w in question.split() if w in names)


def asked_object(clip, qtype: str, word: str | None) -> int | None:
    """Index of the object that ``asked_word`` names (None for other types)."""
    key = "shape" if qtype == "color" else "color"
    return None if word is None else next(k for k, o in enumerate(clip.objects) if getattr(o, key) == word)


def answer_object(clip, answer: str) -> int:
    """Index of the object whose colour is ``answer`` (the temporal questions answer with a colour)."""
    return next(k for k, o in enumerate(clip.objects) if o.color == answer)


def object_pixels(ids: np.ndarray, k: int, patch: int) -> np.ndarray:
    """Int (T * (1 + grid^2),) over the visual tokens (per frame CLS, then patches row-major): how
    many pixels of each patch object ``k`` of the id video ``ids`` (T, H, W) draws (0 on CLS)."""
    frames, grid = ids.shape[0], ids.shape[1] // patch
    drawn = (ids == k).reshape(frames, grid, patch, grid, patch).sum((2, 4))
    return np.concatenate([np.zeros((frames, 1), drawn.dtype), drawn.reshape(frames, -1)], 1).reshape(-1)


def object_tokens(ids: np.ndarray, k: int, patch: int, min_pixels: int = 4) -> np.ndarray:
    """Bool over the visual tokens (as ``object_pixels``): the patches object ``k`` covers at least
    ``min_pixels`` of."""
    return object_pixels(ids, k, patch) >= min_pixels


class PointerLoss:
    """Captures one decoder layer's input during the model's own forward and scores one head's
    attention from one position of each sample (the answer position, or the asked word's)."""

    def __init__(self, model, layer: int, head: int = 0):
        self.layer = model.model.language_model.layers[layer]
        self.head = head
        self.seen: dict = {}
        self.hook = self.layer.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs) -> None:
        self.seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        self.seen["cos_sin"] = kwargs["position_embeddings"]

    def __call__(self, query_index: torch.Tensor, within: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean ``-log`` share of the head's attention within ``within`` that falls on ``target``, over
        the samples asked.

        ``query_index`` (b,): the position each sample's row is taken at (-1: a sample without a
        target); ``within`` (b, n) bool: the positions the share is taken of (the visual tokens, or
        all); ``target`` (b, n) bool: the asked object's patches, or the asked word."""
        asked = query_index >= 0
        if not asked.any():
            return self.seen["hidden"].new_zeros(())
        logp = self.log_attention(asked, query_index[asked, None])[:, 0]  # (b, n)
        on_within = logp.masked_fill(~within[asked], float("-inf")).logsumexp(-1)
        on_target = logp.masked_fill(~target[asked], float("-inf")).logsumexp(-1)
        return (on_within - on_target).mean()

    def log_attention(self, samples: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The head's causal attention log-probabilities (b, r, n) from positions ``rows`` (b, r) of
        the ``samples`` (bool over the batch), recomputed from the captured layer input."""
        hidden, (cos, sin) = self.seen["hidden"][samples], self.seen["cos_sin"]
        cos, sin = cos.expand(len(samples), -1, -1)[samples], sin.expand(len(samples), -1, -1)[samples]
        attn = self.layer.self_attn
        x = self.layer.input_layernorm(hidden)
        at = rows[..., None].expand(-1, -1, x.shape[-1])
        q = attn.q_proj(x.gather(1, at)).view(*rows.shape, -1, attn.head_dim)[:, :, self.head]  # (b, r, hd)
        group = attn.config.num_attention_heads // attn.config.num_key_value_heads
        k = attn.k_proj(x).view(*x.shape[:2], -1, attn.head_dim)[:, :, self.head // group]  # (b, n, hd)
        at = rows[..., None].expand(-1, -1, cos.shape[-1])
        q, _ = apply_rotary_pos_emb(q[:, None], q[:, None], cos.gather(1, at), sin.gather(1, at))
        k, _ = apply_rotary_pos_emb(k[:, None], k[:, None], cos, sin)
        scores = (q[:, 0] @ k[:, 0].transpose(-1, -2)).float() * attn.scaling  # (b, r, n)
        future = torch.arange(x.shape[1], device=x.device)[None, None] > rows[..., None]
        return scores.masked_fill(future, float("-inf")).log_softmax(-1)

    def close(self) -> None:
        self.hook.remove()


class FramePointer(PointerLoss):
    """One head of one layer pushed to attend from every visual token of frames 1.. to the same
    token one frame earlier (``-log`` of that share of its video attention, mean over those tokens).

    Why: "how many objects move ?" and the colours a frame lost both need a token to compare itself
    with the same place in the previous frame, 65 tokens back. After 1300 steps of temporal facts the
    heads read motion 0.74 of the time (always "still": 0.58) and the colours lost no better than
    "none": no head had learnt that look. The word pointer (above) taught the lookups the same way."""

    def __call__(self, visual: torch.Tensor, per_frame: int) -> torch.Tensor:
        """``visual`` (b, n) bool marks the video tokens (the same count in every sample);
        ``per_frame`` tokens make one frame."""
        where = visual.nonzero()[:, 1].view(len(visual), -1)  # (b, visual tokens)
        rows, target = where[:, per_frame:], where[:, :-per_frame]
        logp = self.log_attention(torch.ones(len(visual), dtype=torch.bool, device=visual.device), rows)
        on_within = logp.masked_fill(~visual[:, None], float("-inf")).logsumexp(-1)
        on_target = logp.gather(2, target[..., None])[..., 0]
        return (on_within - on_target).mean()


class AuxLosses:
    """A yardstick's auxiliary losses, weighted and summed (the caller fades the sum out)."""

    def __init__(self, model, y):
        self.y = y
        self.pointer = PointerLoss(model, y.pointer_layer) if y.pointer_weight else None
        self.copy = PointerLoss(model, y.copy_layer) if y.copy_weight else None
        self.from_word = PointerLoss(model, y.word_pointer_layer) if y.word_pointer_weight else None

    @property
    def active(self) -> bool:
        return any(loss is not None for loss in (self.pointer, self.copy, self.from_word))

    def __call__(self, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        y, asked = self.y, targets["query_index"]
        has_word = targets["word"].any(-1)  # colour/shape questions (not the answer pointer's temporal ones)
        total = targets["visual"].new_zeros((), dtype=torch.float32)
        if self.pointer is not None:
            total = total + y.pointer_weight * self.pointer(asked, targets["visual"], targets["target"])
        if self.copy is not None:
            everything = torch.ones_like(targets["visual"])
            total = total + y.copy_weight * self.copy(torch.where(has_word, asked, -1), everything, targets["word"])
        if self.from_word is not None:
            word_index = torch.where(has_word, targets["word"].int().argmax(-1), -1)
            total = total + y.word_pointer_weight * self.from_word(word_index, targets["visual"], targets["target"])
        return total

    def close(self) -> None:
        for loss in (self.pointer, self.copy, self.from_word):
            if loss is not None:
                loss.close()
