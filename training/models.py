"""Model loading shared by SFT and evaluation: resolve a model reference to a local folder, check
it, load the model with its tokenizer and (for Qwen2(.5)-VL) image processor, and tell vision models
from text models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from octomed_data import storage
from octomed_data.errors import ConfigError
from training.checkpoints import CHECKPOINT_MARKER, download_folder

VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# A Hugging Face model id: ``owner/name``.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a from_pretrained load needs: weights, configs, tokenizer and processor files.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]


def is_vision_model(model_path: str | Path) -> bool:
    """Whether the checkpoint at ``model_path`` is a Qwen2(.5)-VL (reads config.json only)."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    return cfg.get("model_type") in VL_MODEL_TYPES


def check_model_path(model_path: str) -> Path:
    """A local model folder with ``config.json``; anything else is one clear error."""
    path = Path(model_path)
    if "://" in model_path or not (path / "config.json").is_file():
        raise ConfigError(
            f"model_path {model_path!r} is not a local model folder with config.json "
            "(give a folder, a finished checkpoint URI, or a Hugging Face model id)"
        )
    return path


def is_hub_id(model: str) -> bool:
    """Whether ``model`` reads as a Hugging Face model id (``owner/name``)."""
    return bool(HUB_ID.match(model))


def resolve_model(model: str, cache_dir: Path) -> Path:
    """A local folder holding ``model``: a folder is used in place, a finished checkpoint URI
    (``s3://``/``file://``, with ``checkpoint.json``) is downloaded into ``cache_dir``, and a Hugging Face
    model id (``Qwen/Qwen2.5-VL-7B-Instruct``) comes from the local HF cache, or from the hub where it is
    reachable (``HF_HUB_OFFLINE=1`` forbids that). Whatever fails is one :class:`ConfigError` line.
    """
    if "://" in model and not model.startswith("file://"):
        marker_uri = storage.join(model, CHECKPOINT_MARKER)
        if not storage.exists(marker_uri):
            raise ConfigError(f"no {CHECKPOINT_MARKER} at {model}: not a finished checkpoint")
        marker = storage.read_json(marker_uri)
        local = cache_dir / "checkpoint"
        done = local / ".complete"
        if not done.is_file() or done.read_text() != marker.get("created_at", ""):
            download_folder(model, marker.get("files") or [], local)
            done.write_text(marker.get("created_at", ""))
        return check_model_path(str(local))
    path = Path(model.removeprefix("file://"))
    if path.exists() or not is_hub_id(model):
        return check_model_path(str(path))
    try:
        from huggingface_hub import snapshot_download

        return check_model_path(snapshot_download(model, allow_patterns=MODEL_FILES))
    except ConfigError:
        raise
    except Exception as exc:  # offline, unknown repo, gated model, no network
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot resolve model {model!r} from the Hugging Face cache or hub ({type(exc).__name__}: "
            f"{first[:200]}); download it where the hub is reachable and give the local folder"
        ) from None


def load_model_and_processors(
    model_path: str | Path, torch_dtype: Any = None, attn_implementation: str = "auto"
):
    """(model, tokenizer, image_processor or None) from a local folder, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"tokenizer at {model_path} has no pad token")
    kwargs = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if attn_implementation != "auto":
        if attn_implementation.startswith("flash"):
            import importlib.util

            if importlib.util.find_spec("flash_attn") is None:
                raise ConfigError(
                    "attn_implementation flash_attention_2 needs flash-attn on a GPU "
                    "(pip install flash-attn --no-build-isolation); use auto or sdpa here"
                )
        kwargs["attn_implementation"] = attn_implementation
    if is_vision_model(model_path):
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(str(model_path), **kwargs)
        image_processor = load_image_processor(model_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
        image_processor = None
    return model, tokenizer, image_processor


def load_image_processor(model_path: str | Path):
    """The PIL Qwen2-VL image processor (the torchvision one can't be installed on CPU machines)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if not (Path(model_path) / "preprocessor_config.json").is_file():
        raise ConfigError(f"vision model at {model_path} has no preprocessor_config.json")
    return Qwen2VLImageProcessorPil.from_pretrained(str(model_path), local_files_only=True)


def image_only_vl_processor_class() -> type:
    """Qwen2.5-VL's processor class for images only: it accepts no video processor (the torchvision
    one can't be installed on CPU machines), so it is built with ``video_processor=None``."""
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyVLProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    return ImageOnlyVLProcessor
