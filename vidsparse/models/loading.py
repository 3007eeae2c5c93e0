"""Find and load a checkpoint of any registered family, turning every way a checkpoint can be broken into one
line that names the file and what is wrong with it.

A checkpoint is a hub id, a local folder (what `save_pretrained` writes), or an alias of a folder
the project ships. Each part is loaded on its own (config, tokenizer, weights, pixel statistics)
so that a failure can say which file caused it; offline, only the local cache is consulted (the
hub client would otherwise retry for ~25 s before failing).
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import cached_file

from vidsparse.errors import UserError, first_line
from vidsparse.models.families import family_for
from vidsparse.models.family import VIDEO_PROCESSOR_FILE, VideoModel

# Names for the checkpoints the project ships, inside the package (vidsparse/shipped/).
_SHIPPED = Path(__file__).resolve().parents[1] / "shipped"  # package data: there in a wheel's install too
ALIASES = {"shapes-demo": _SHIPPED / "shapes-videollava", "shapes-hd": _SHIPPED / "shapes-hd-videollava",
           "shapes-hd-plain": _SHIPPED / "shapes-hd-plain",
           "shapes-ov": _SHIPPED / "shapes-onevision", "shapes-qwen": _SHIPPED / "shapes-qwen"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """Where a checkpoint comes from: `name` as the user gave it, `location` for from_pretrained."""

    name: str
    location: str  # a folder path or a hub id
    local_only: bool  # look only on disk / in the local cache

    @property
    def identity(self) -> str:
        """The checkpoint's name independent of the working directory (an alias or a hub id as given,
        a folder as its absolute path): what a results file records."""
        local = Path(self.location).exists() and self.name not in ALIASES
        return str(Path(self.location).resolve()) if local else self.name

    def file(self, filename: str) -> str:
        """How to name one of its files in an error message."""
        return str(Path(self.location) / filename) if Path(self.location).is_dir() else f"{filename} of {self.name}"

    def weights_file(self) -> str:
        folder = Path(self.location)
        found = next((f for f in WEIGHT_FILES if (folder / f).is_file()), None) if folder.is_dir() else None
        return self.file(found) if found else f"the weights of {self.name}"


WHOLE_FILE_LIMIT = 1 << 30  # weight files up to this size are hashed whole
SAMPLES, SAMPLE_BYTES = 64, 1 << 20  # larger ones: this many evenly spaced pieces of this size


def weights_fingerprint(source: Source) -> str | None:
    """A digest of a local checkpoint's weight files (None for a hub id, which names its weights): a
    folder's name or an alias cannot tell two sets of weights apart (a model retrained in place, a
    release that ships new weights under the same alias), and a results file must not mix their
    answers. Files up to 1 GiB are hashed whole; a larger one by its size and 64 evenly spaced MiB
    (training changes every tensor), so that a 14 GB checkpoint costs 64 MiB of reading, not 14 GB."""
    folder = Path(source.location)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.name} {size}\n".encode())
        with open(path, "rb") as file:
            if size <= WHOLE_FILE_LIMIT:
                while piece := file.read(SAMPLE_BYTES):
                    digest.update(piece)
                continue
            for k in range(SAMPLES):
                file.seek(max(0, size - SAMPLE_BYTES) * k // (SAMPLES - 1))
                digest.update(file.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def find_checkpoint(name_or_path: str) -> Source:
    """Resolve an alias, check that a local folder holds the config of a family vidsparse runs;
    anything else is a hub id."""
    if not name_or_path.strip():
        raise UserError("--model is empty: give a hub id like LanguageBind/Video-LLaVA-7B-hf, a checkpoint folder, "
                        "or shapes-demo")
    location = name_or_path
    if name_or_path in ALIASES:
        if not ALIASES[name_or_path].is_dir():
            raise UserError(f"{name_or_path}: the shipped checkpoint is missing ({ALIASES[name_or_path]}); "
                            "run vidsparse from a full checkout of the repository")
        location = str(ALIASES[name_or_path])
    path = Path(location).expanduser()
    if path.exists():
        config_file = path / "config.json"
        if not path.is_dir():
            raise UserError(f"{name_or_path} is a file: --model takes the checkpoint's folder (the one holding "
                            "config.json)")
        _check_regular_files(path)
        if not config_file.is_file():
            raise UserError(f"{name_or_path} is not a model folder (no config.json in it)")
        config = _read_json(config_file)
        family_for(config.get("model_type") if isinstance(config, dict) else None, name_or_path)
        return Source(name_or_path, str(path), local_only=True)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise UserError(f"model not found: {name_or_path} is neither a local folder nor a hub id like 'org/name'")
    return Source(name_or_path, name_or_path, local_only=not hub_reachable())


def _check_regular_files(folder: Path) -> None:
    """A checkpoint's files are read whole: one that is a FIFO would block the reader forever (and a
    device never end), so each is looked at with stat, before anything is opened."""
    for entry in sorted(folder.iterdir()):
        try:
            mode = entry.stat().st_mode
        except FileNotFoundError:  # a dangling link: a file the loader would not find either
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UserError(f"{entry} is not a regular file (a pipe, socket or device): a checkpoint's files are "
                            "read whole")


def peek_config(name_or_path: str) -> tuple[type[VideoModel], PretrainedConfig] | None:
    """The checkpoint's family and config if it is on disk already (a folder or the hub cache), without
    loading weights: lets the CLI check a clip's length against the context before decoding it."""
    source = find_checkpoint(name_or_path)
    try:
        local = Source(source.name, source.location, local_only=True)
        family = find_family(local)
        return family, load_config(local, family)
    except UserError:
        return None


def find_family(source: Source) -> type[VideoModel]:
    """The family of a checkpoint, from its config.json's model_type."""
    where = source.file("config.json")
    path = _loading(source, where, lambda: cached_file(source.location, "config.json",
                                                         local_files_only=source.local_only))
    raw = _read_json(Path(path), where)
    return family_for(raw.get("model_type") if isinstance(raw, dict) else None, where)


def load_config(source: Source, family: type[VideoModel]) -> PretrainedConfig:
    where = source.file("config.json")
    raw, _ = _loading(source, where, lambda: family.config_class.get_config_dict(
        source.location, local_files_only=source.local_only))
    for part in ("vision_config", "text_config"):  # else transformers fills in a 7B model's defaults unsaid
        if not isinstance(raw.get(part), dict):
            raise UserError(f"{where} has no {part}: not a complete {family.model_type} checkpoint's config")
    config = _loading(source, where, lambda: family.config_class.from_dict(raw))
    problems = _loading(source, where, lambda: family.check_config(config))
    if problems:
        raise UserError(f"{where}: {problems[0]}")
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a fast, SentencePiece or BPE tokenizer


def load_tokenizer(source: Source, config: PretrainedConfig, family: type[VideoModel]) -> PreTrainedTokenizerBase:
    where = source.file("tokenizer.json")
    folder = Path(source.location)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise UserError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}): copy the tokenizer files of "
                        "the model's release beside its weights")
    tokenizer = _loading(source, where, lambda: AutoTokenizer.from_pretrained(
        source.location, local_files_only=source.local_only))
    text, token_id = family.placeholder(config)
    placeholder = tokenizer(text, add_special_tokens=False).input_ids
    if placeholder != [token_id]:
        raise UserError(f"{where}: the tokenizer turns {text!r} into {placeholder}, but config.json's "
                        f"video token id is {token_id}: tokenizer and config do not belong together")
    if len(tokenizer) > config.text_config.vocab_size:
        raise UserError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                        f"{config.text_config.vocab_size}: tokenizer and config do not belong together")
    return tokenizer


def load_weights(source: Source, config: PretrainedConfig, dtype: torch.dtype,
                 family: type[VideoModel]) -> PreTrainedModel:
    where = source.weights_file()

    def load():
        with warnings.catch_warnings():  # torch's pickle-protocol chatter; a refusal is reported below
            warnings.simplefilter("ignore")
            return family.model_class.from_pretrained(
                source.location, config=config, dtype=dtype, attn_implementation="sdpa",
                local_files_only=source.local_only, output_loading_info=True, ignore_mismatched_sizes=True)

    model, info = _loading(source, where, load)
    mismatched = sorted(info["mismatched_keys"])
    if mismatched:
        key, in_file, by_config = mismatched[0]
        raise UserError(f"{where} does not match config.json: {len(mismatched)} tensors differ in shape, e.g. "
                        f"{key} is {tuple(in_file)} in the file but {tuple(by_config)} by the config")
    unused = family.unused_weights()  # parts a video question never runs
    missing = sorted(k for k in info["missing_keys"] if not any(part in k for part in unused))
    if missing:
        raise UserError(f"{where} lacks {len(missing)} of the model's tensors, e.g. {missing[0]}")
    return model


def load_pixel_stats(source: Source, family: type[VideoModel]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation from the checkpoint's preprocessor_config.json if it has one, else the family's."""
    where = source.file("preprocessor_config.json")
    path = _loading(source, where, lambda: cached_file(
        source.location, "preprocessor_config.json", local_files_only=source.local_only,
        _raise_exceptions_for_missing_entries=False))
    defaults = family.default_pixel_stats()
    if path is None:
        return defaults
    config = _read_json(Path(path), where)
    stats = []
    for key, default in zip(("image_mean", "image_std"), defaults, strict=True):
        value = config.get(key, default) if isinstance(config, dict) else None
        if (not isinstance(value, list | tuple) or len(value) != 3
                or not all(isinstance(v, int | float) and math.isfinite(v) for v in value)
                or (key == "image_std" and min(value) <= 0)):
            raise UserError(f"{where}: {key} must be three finite numbers" + (" above 0" if key == "image_std" else "")
                            + f", got {value!r}")
        stats.append(tuple(float(v) for v in value))
    return stats[0], stats[1]


def load_model(name_or_path: str, dtype: str = "auto", device: str = "auto") -> VideoModel:
    """Load a checkpoint of whichever family its config names, from a hub id, an alias or a folder."""
    return load_family(None, name_or_path, dtype, device)


def load_family(family: type[VideoModel] | None, name_or_path: str, dtype: str, device: str) -> VideoModel:
    """Load a checkpoint as `family` (None: the one its config names), by the same `from_pretrained`
    path for every checkpoint, each part on its own so that a failure names its file."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = find_checkpoint(name_or_path)
    found = find_family(source)
    if family is not None and found is not family:
        raise UserError(f"{name_or_path} is a {found.model_type} checkpoint, not {family.model_type}")
    config = load_config(source, found)
    tokenizer = load_tokenizer(source, config, found)
    mean, std = load_pixel_stats(source, found)
    video_processor = load_video_processor(source)
    weights = load_weights(source, config, torch_dtype, found)
    loaded = found(weights, tokenizer, name_or_path, mean, std, video_processor)
    loaded.drop_unused()
    loaded.model.to(torch_device).eval()
    return loaded


def load_video_processor(source: Source) -> dict | None:
    """The checkpoint's video_preprocessor_config.json, if it has one (how a family sizes video frames)."""
    where = source.file(VIDEO_PROCESSOR_FILE)
    path = _loading(source, where, lambda: cached_file(
        source.location, VIDEO_PROCESSOR_FILE, local_files_only=source.local_only,
        _raise_exceptions_for_missing_entries=False))
    if path is None:
        return None
    config = _read_json(Path(path), where)
    if not isinstance(config, dict):
        raise UserError(f"{where} must hold a JSON object")
    return config


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


def hub_reachable() -> bool:
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _loading(source: Source, where: str, load: Callable[[], T]) -> T:
    """Run one loading step; whatever it raises becomes one line naming `where`."""
    try:
        return load()
    except UserError:
        raise
    except OSError as e:  # missing files, hub errors
        if not Path(source.location).exists():
            raise UserError(_hub_failure(source.name, e)) from e
        raise UserError(f"cannot load {where}: {first_line(e, with_type=False)}") from e
    except Exception as e:  # noqa: BLE001 - a broken file can make any library raise anything
        reason = ("it holds pickled code, not only tensors; vidsparse will not run it (convert the checkpoint to "
                  "safetensors where you trust it)" if "weights only load failed" in str(e).lower()
                  else first_line(e))
        raise UserError(f"cannot load {where}: {reason}") from e


def _hub_failure(name: str, error: OSError) -> str:
    if not hub_reachable():
        return (f"cannot load {name!r}: it is not in the local Hugging Face cache and the hub cannot be reached. "
                f"Download it where there is network (`hf download {name}`), copy the folder here, "
                f"and pass --model /path/to/that/folder")
    return f"cannot load {name!r} from the hub: {first_line(error, with_type=False)}"


def _read_json(path: Path, where: str | None = None) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where or path} is not valid JSON: {e}") from e
