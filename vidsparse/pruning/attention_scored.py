"""FastV and PyramidDrop: keep the visual tokens the last prompt token attends to most (SPEC 5)."""

from __future__ import annotations

from vidsparse.pruning.base import Method, Selection, StageInput, top_k


class FastV(Method):
    summary = "one stage after layer K-1 (K=2): keep the B tokens the last prompt token attends to most"
    needs_attention = True

    def default_stages(self, num_layers: int) -> list[int]:
        return [1]

    def stage_size(self, stage: StageInput) -> int:
        return stage.budget

    def select(self, stage: StageInput) -> Selection:
        scores = stage.attention.mean(0)
        return Selection(top_k(scores, self.stage_size(stage), stage.frames, stage.min_per_frame))


class PyramidDrop(FastV):
    summary = "stages at 1/4, 1/2, 3/4 depth keeping n*r, n*r^2, ..., B (r = (B/n)^(1/stages)), last-token attention"

    def default_stages(self, num_layers: int) -> list[int]:
        # After layers 7, 15, 23 of 32, scaled; a stage after the last layer would change nothing.
        return sorted({min(max(0, round(num_layers * q / 4) - 1), num_layers - 2) for q in (1, 2, 3)})

    def stage_size(self, stage: StageInput) -> int:
        if stage.is_last:
            return stage.budget
        ratio = stage.budget / stage.num_visual
        return max(stage.budget, round(stage.num_visual * ratio ** ((stage.index + 1) / stage.num_stages)))
