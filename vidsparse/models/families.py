"""The model families vidsparse runs, by the `model_type` of a checkpoint's config.json: adding a
family is its module plus one line here."""

from __future__ import annotations

import importlib

from vidsparse.errors import UserError
from vidsparse.models.family import VideoModel

FAMILIES: dict[str, str] = {  # model_type -> "module.Class" under vidsparse.models
    "video_llava": "video_llava.VideoLlava",
    "llava_onevision": "llava_onevision.LlavaOnevision",
    "qwen2_5_vl": "qwen2_5_vl.Qwen25VL",
}


def family_for(model_type: object, where: str) -> type[VideoModel]:
    """The family class that runs checkpoints of `model_type` (read from `where`, named in the error)."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise UserError(f"{where} is not a checkpoint of a model family vidsparse runs (model_type is "
                        f"{model_type!r}; supported: {', '.join(FAMILIES)})")
    module, name = FAMILIES[model_type].rsplit(".", 1)
    return getattr(importlib.import_module(f"vidsparse.models.{module}"), name)
