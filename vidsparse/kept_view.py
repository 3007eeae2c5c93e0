"""Picture of what pruning kept: the sampled frames in a grid, surviving patches lit, recycled
(merged) tokens outlined in another colour, the question as title."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vidsparse.answer import AskResult
from vidsparse.models.family import VideoModel
from vidsparse.outputs import save_figure

KEPT_COLOUR = "#2ecc40"
MERGED_COLOUR = "#ff851b"


def draw_kept(result: AskResult, model: VideoModel, path: Path, title: str | None = None) -> Path:
    """Write a PNG of `result`'s frames (as the model saw them: resized, cropped) with the visual
    tokens that reached the last layer highlighted (a token covering several frames, on each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    images = (model.seen_frames(result.video.frames) / 255).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    num_frames, height, width = images.shape[:3]
    visual = result.visual_map
    patch_h, patch_w = height / (int(visual.row.max()) + 1), width / (int(visual.col.max()) + 1)
    span = visual.frames_per_span
    kept = result.kept_tokens()
    columns = min(4, num_frames)
    rows = -(-num_frames // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows + 0.8), squeeze=False,
                             layout="constrained")
    for f, ax in enumerate(axes.flat):
        ax.axis("off")
        if f >= num_frames:
            continue
        light = np.full((height, width, 1), 0.3)  # pruned patches dimmed, kept ones at full light
        boxes = []
        for token in (t for t in kept if t["frame"] == f // span):
            colour = MERGED_COLOUR if token["merged"] else KEPT_COLOUR
            if token["row"] < 0:  # CLS: a badge in the corner
                ax.text(1, 1, "CLS", color="black", fontsize=7, va="top", bbox={"facecolor": colour, "pad": 1})
                continue
            y, x = round(token["row"] * patch_h), round(token["col"] * patch_w)
            light[y : round(y + patch_h), x : round(x + patch_w)] = 1.0
            boxes.append(Rectangle((x - 0.5, y - 0.5), patch_w, patch_h, fill=False, edgecolor=colour,
                                   linewidth=1.2))
        ax.imshow(images[f] * light, interpolation="nearest")
        for box in boxes:
            ax.add_patch(box)
        count = sum(1 for t in kept if t["frame"] == f // span)
        ax.set_title(f"frame {result.video.indices[f]}: {count} tokens", fontsize=9)
    stats = result.to_dict()["pruning"]
    fig.suptitle(title or result.question, fontsize=12)
    fig.supxlabel(f"{stats['method']}, {len(kept)} of {result.visual_before} visual tokens kept "
                  f"(green: kept, orange: recycled/merged) -- answer: {result.answer}", fontsize=9)
    save_figure(fig, path)
    return path
