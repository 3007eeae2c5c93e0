"""Picture of what pruning kept: the sampled frames in a grid, surviving patches lit, recycled
(merged) tokens outlined in another colour, the question as title."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vidsparse.answer import AskResult
from vidsparse.outputs import save_figure
from vidsparse.preprocess import preprocess_frames

KEPT_COLOUR = "#2ecc40"
MERGED_COLOUR = "#ff851b"


def draw_kept(result: AskResult, image_size: int, mean, std, path: Path, title: str | None = None) -> Path:
    """Write a PNG of `result`'s frames (as the model saw them: resized and centre-cropped) with
    the visual tokens that reached the last layer highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    pixels = preprocess_frames(result.video.frames, image_size, mean, std)
    images = (pixels * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
    images = images.permute(0, 2, 3, 1).numpy()
    num_frames = images.shape[0]
    grid = int(result.visual_map.row.max()) + 1
    patch = image_size / grid
    kept = result.kept_tokens()
    columns = min(4, num_frames)
    rows = -(-num_frames // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows + 0.8), squeeze=False,
                             layout="constrained")
    for f, ax in enumerate(axes.flat):
        ax.axis("off")
        if f >= num_frames:
            continue
        light = np.full((image_size, image_size, 1), 0.3)  # pruned patches dimmed, kept ones at full light
        boxes = []
        for token in (t for t in kept if t["frame"] == f):
            colour = MERGED_COLOUR if token["merged"] else KEPT_COLOUR
            if token["row"] < 0:  # CLS: a badge in the corner
                ax.text(1, 1, "CLS", color="black", fontsize=7, va="top", bbox={"facecolor": colour, "pad": 1})
                continue
            y, x = round(token["row"] * patch), round(token["col"] * patch)
            light[y : round(y + patch), x : round(x + patch)] = 1.0
            boxes.append(Rectangle((x - 0.5, y - 0.5), patch, patch, fill=False, edgecolor=colour, linewidth=1.2))
        ax.imshow(images[f] * light, interpolation="nearest")
        for box in boxes:
            ax.add_patch(box)
        count = sum(1 for t in kept if t["frame"] == f)
        ax.set_title(f"frame {result.video.indices[f]}: {count} tokens", fontsize=9)
    stats = result.to_dict()["pruning"]
    fig.suptitle(title or result.question, fontsize=12)
    fig.supxlabel(f"{stats['method']}, {len(kept)} of {result.visual_before} visual tokens kept "
                  f"(green: kept, orange: recycled/merged) -- answer: {result.answer}", fontsize=9)
    save_figure(fig, path)
    return path
