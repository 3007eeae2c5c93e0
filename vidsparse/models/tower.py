"""What the families' vision towers share for the methods that read inside them: the encoder layer a
projector reads, and that layer's input and output during one forward pass (by hooks, so the
tower runs as HF runs it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from vidsparse.errors import UserError

T = TypeVar("T")


def feature_layer(layers: Sequence[T], index: object) -> T:
    """The encoder layer (or its number, given `range(layers)`) whose output is hidden_states[index]
    (`vision_feature_layer`, negative from the end): the one the projector reads."""
    if isinstance(index, int):
        index %= len(layers) + 1
    if not isinstance(index, int) or index < 1:
        raise UserError(f"this checkpoint feeds the projector from vision_feature_layer {index}: there is no single "
                        "tower layer whose output it reads (to read saliency from, or to cut after)")
    return layers[index - 1]  # hidden_states[k] is the output of layer k - 1


def run_reading(layer: torch.nn.Module, run: Callable[[], T]) -> tuple[T, torch.Tensor, torch.Tensor]:
    """`run()`'s result, and the hidden states that went into and came out of `layer` meanwhile."""
    seen = {}

    def keep_input(module, args, kwargs) -> None:
        seen["input"] = args[0] if args else kwargs["hidden_states"]

    def keep_output(module, args, output) -> None:
        seen["output"] = output[0] if isinstance(output, tuple) else output

    hooks = [layer.register_forward_pre_hook(keep_input, with_kwargs=True), layer.register_forward_hook(keep_output)]
    try:
        result = run()
    finally:
        for hook in hooks:
            hook.remove()
    return result, seen["input"], seen["output"]
