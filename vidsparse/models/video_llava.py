"""VideoLLaVA adapter: load any checkpoint, build the prompt, embed a clip.

Everything model-specific the engine needs lives here: the decoder (a LlamaModel), the LM head,
and `embed`, which returns the prompt's input embeddings together with a map of which positions
are visual and which frame / row / column each one comes from (pruning keeps that map).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, VideoLlavaForConditionalGeneration
from transformers.utils import cached_file

from vidsparse.errors import UserError
from vidsparse.preprocess import CLIP_MEAN, CLIP_STD

DEFAULT_MODEL = "LanguageBind/Video-LLaVA-7B-hf"
# Names for checkpoints the project ships (in the repository's models/ folder).
ALIASES = {"shapes-demo": Path(__file__).resolve().parents[2] / "models" / "shapes-videollava"}
PROMPT_TEMPLATE = "USER: <video>\n{question} ASSISTANT:"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, n_visual: int, video_token_id: int) -> list[int]:
    """Token ids of the VideoLLaVA prompt, `<video>` expanded to `n_visual` placeholder tokens.

    The placeholder is repeated in the text before tokenizing, exactly as VideoLlavaProcessor does,
    so the ids around it are the ones the checkpoint was trained with.
    """
    prefix, suffix = PROMPT_TEMPLATE.split("<video>")
    text = prefix + "<video>" * n_visual + suffix.format(question=question)
    ids = tokenizer(text).input_ids
    found = sum(1 for i in ids if i == video_token_id)
    if found != n_visual:
        raise ValueError(f"tokenizer produced {found} video tokens, expected {n_visual}")
    return ids


@dataclass(frozen=True)
class VisualMap:
    """Where the visual tokens sit in the prompt and where each came from in the clip."""

    positions: torch.Tensor  # (n_visual,) sequence positions, ascending
    frame: torch.Tensor  # (n_visual,) sampled-frame number
    row: torch.Tensor  # (n_visual,) patch row, -1 for the CLS token
    col: torch.Tensor  # (n_visual,) patch column, -1 for the CLS token
    is_cls: torch.Tensor  # (n_visual,) bool

    def __len__(self) -> int:
        return int(self.positions.numel())


def visual_map(positions: torch.Tensor, num_frames: int, grid: int) -> VisualMap:
    """Frame-major layout of the video tower's output: per frame, CLS then grid x grid patches."""
    per_frame = grid * grid + 1
    index = torch.arange(num_frames * per_frame)
    in_frame = index % per_frame
    patch = in_frame - 1
    is_cls = in_frame == 0
    return VisualMap(
        positions=positions,
        frame=index // per_frame,
        row=torch.where(is_cls, -1, patch // grid),
        col=torch.where(is_cls, -1, patch % grid),
        is_cls=is_cls,
    )


@dataclass(frozen=True)
class PromptEmbeds:
    input_ids: torch.Tensor  # (1, n)
    embeds: torch.Tensor  # (1, n, d)
    visual: VisualMap
    suffix_words: list[str]  # the tokens after the visual block (question and template), as text


class VideoLlava:
    """A loaded VideoLLaVA checkpoint (video tower, projector, Llama decoder, LM head) + tokenizer."""

    def __init__(self, model: VideoLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, name: str,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.mean, self.std = mean, std
        config = model.config
        self.image_size: int = config.vision_config.image_size
        self.grid: int = self.image_size // config.vision_config.patch_size
        self.tokens_per_frame: int = self.grid * self.grid + 1  # patches + CLS (kept for video)
        self.video_token_id: int = config.video_token_id
        eos = config.text_config.eos_token_id
        self.eos_token_ids: set[int] = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id} - {None}

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto"
    ) -> VideoLlava:
        """Load from a hub id or a local folder, by the same `from_pretrained` path for every checkpoint."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        source = _checked_source(name_or_path)
        # Offline, look only in the local cache: the hub client would retry for ~25 s before failing.
        local_only = Path(source).exists() or not _hub_reachable()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            model = VideoLlavaForConditionalGeneration.from_pretrained(
                source, dtype=torch_dtype, attn_implementation="sdpa", local_files_only=local_only
            )
        except OSError as e:
            raise UserError(_load_failure(name_or_path, e)) from e
        # Video-only use: the image tower is never run (0.3B parameters on the 7B model).
        model.model.image_tower = None
        model.to(torch_device).eval()
        mean, std = _pixel_stats(source, local_only)
        return cls(model, tokenizer, name_or_path, mean, std)

    @property
    def decoder(self):
        """The Llama decoder (embed_tokens, layers, norm, rotary_emb)."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.model.lm_head

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def prompt_ids(self, question: str, num_frames: int) -> torch.Tensor:
        ids = prompt_ids(self.tokenizer, question, num_frames * self.tokens_per_frame, self.video_token_id)
        return torch.tensor([ids], device=self.device)

    @torch.inference_mode()
    def video_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(T, 3, S, S) pixels -> (T, tokens_per_frame, d) projected visual tokens."""
        pixels = pixels.to(self.device, self.dtype)
        return self.model.model.get_video_features(pixel_values_videos=pixels[None]).pooler_output

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, features: torch.Tensor) -> PromptEmbeds:
        """Text embeddings with the visual features scattered, frame-major, into the placeholders."""
        embeds = self.decoder.embed_tokens(input_ids)
        is_video = input_ids[0] == self.video_token_id
        positions = is_video.nonzero().squeeze(1)
        flat = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        if flat.shape[0] != positions.numel():
            raise ValueError(f"{flat.shape[0]} visual features for {positions.numel()} placeholders")
        embeds[0, positions] = flat
        num_frames = features.shape[0]
        suffix = input_ids[0, int(positions[-1]) + 1 :].tolist()
        words = [self.tokenizer.decode([i]).strip() for i in suffix]
        return PromptEmbeds(input_ids, embeds, visual_map(positions.cpu(), num_frames, self.grid), words)

    def decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r}: choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU here")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: float32 on CPU (fastest there for small models, exact), bfloat16 on a GPU that has it."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose auto, float32, float16 or bfloat16")
    return DTYPES[dtype]


def _checked_source(name_or_path: str) -> str:
    """A local folder must hold a VideoLLaVA config; anything else is taken as a hub id."""
    if name_or_path in ALIASES:
        if not ALIASES[name_or_path].is_dir():
            raise UserError(f"{name_or_path}: the shipped checkpoint is missing ({ALIASES[name_or_path]}); "
                            "run vidsparse from a full checkout of the repository")
        name_or_path = str(ALIASES[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.exists():
        config_file = path / "config.json"
        if not path.is_dir() or not config_file.is_file():
            raise UserError(f"{name_or_path} is not a model folder (no config.json in it)")
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{config_file} is not valid JSON: {e}") from e
        if model_type != "video_llava":
            raise UserError(f"{name_or_path} is not a VideoLLaVA checkpoint (model_type is {model_type!r})")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise UserError(f"model not found: {name_or_path} is neither a local folder nor a hub id like 'org/name'")
    return name_or_path


def _hub_reachable() -> bool:
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _load_failure(name: str, error: OSError) -> str:
    if Path(name).exists():
        return f"cannot load the checkpoint in {name}: {str(error).splitlines()[0]}"
    if not _hub_reachable():
        return (f"cannot load {name!r}: it is not in the local Hugging Face cache and the hub cannot be reached. "
                f"Download it where there is network (`hf download {name}`), copy the folder here, "
                f"and pass --model /path/to/that/folder")
    return f"cannot load {name!r} from the hub: {str(error).splitlines()[0]}"


def _pixel_stats(source: str, local_only: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation from the checkpoint's preprocessor_config.json if it has one, else CLIP's."""
    config_file = cached_file(source, "preprocessor_config.json", local_files_only=local_only,
                              _raise_exceptions_for_missing_entries=False)
    if config_file is None:
        return CLIP_MEAN, CLIP_STD
    config = json.loads(Path(config_file).read_text())
    return tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD))
