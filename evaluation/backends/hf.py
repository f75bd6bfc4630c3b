"""The ``hf`` backend: ``transformers`` generate on a local model folder, or an ``s3://`` /
``file://`` checkpoint with ``checkpoint.json`` (downloaded once), with seeded sampling. Works on CPU.

Sampling is the protocol's and nothing else: a checkpoint's ``generation_config.json`` carries the
base model's chat defaults (Qwen2.5-VL-7B-Instruct: ``top_k 1``, ``top_p 0.001``, ``temperature
0.1``, ``repetition_penalty 1.05``; fine-tuned checkpoints keep that file), and HF ``generate``
fills every field a call leaves out from it, which would make every seed greedy. So top-k is off
and the repetition penalty 1.0 explicitly; only the stop tokens (the config's eos list plus the
tokenizer's) are taken from the checkpoint. ``describe()["sampling"]`` records the settings in
effect and the checkpoint's sampling fields that were ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evaluation.backends.base import (
    FORCE_CUE,
    THINK_OPEN,
    THINK_PREFILL,
    Generation,
    SamplingProtocol,
    chat_messages,
    reasoning_span,
    resolve_checkpoint,
    still_thinking,
    template_opens_think,
)
from octomed_data import storage
from octomed_data.errors import ConfigError
from training.models import is_vision_model, load_model_and_processors

# Checkpoint generation_config fields that change sampling: recorded when the protocol overrides them.
_SAMPLING_FIELDS = (
    "do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty",
    "no_repeat_ngram_size", "epsilon_cutoff", "eta_cutoff", "num_beams",
)  # fmt: skip


class HFBackend:
    """``transformers`` generate on a local (or downloaded) checkpoint; seeded sampling, CPU or GPU."""

    name = "hf"

    def __init__(
        self, model: str, protocol: SamplingProtocol, *, cache_dir: Path, precision: str = "auto", max_pixels: int = 262144,
        batch_size: int = 8,
    ) -> None:  # fmt: skip
        import torch

        self.model_uri = model
        self.protocol = protocol
        self.batch_size = batch_size
        self.model_dir = resolve_checkpoint(model, cache_dir)
        cuda = torch.cuda.is_available()
        if precision in ("bf16", "fp16") and not cuda:
            raise ConfigError(f"precision {precision!r} needs a GPU; use 'fp32' or 'auto' on CPU")
        chosen = precision if precision != "auto" else ("bf16" if cuda else "fp32")
        self.dtype = chosen
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(chosen, torch.float32)
        self.model, self.tokenizer, self.image_processor = load_model_and_processors(
            self.model_dir, torch_dtype=dtype
        )
        self.model.eval()
        if cuda:
            self.model.to("cuda")
        # Stop on every end token the checkpoint declares (Qwen: <|im_end|> and <|endoftext|>),
        # not only the tokenizer's, and sample with the protocol alone (see the module docstring).
        ckpt = self.model.generation_config
        self.eos_ids = eos_token_ids(getattr(ckpt, "eos_token_id", None), self.tokenizer.eos_token_id)
        self.ignored_generation_config = {
            k: v for k in _SAMPLING_FIELDS if (v := getattr(ckpt, k, None)) is not None
        }
        self.model.generation_config = protocol_generation_config(
            protocol,
            eos_ids=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=getattr(ckpt, "bos_token_id", None),
        )
        self.device = self.model.device
        self.supports_images = is_vision_model(self.model_dir)
        self.max_pixels = max_pixels
        self.image_token = "<|image_pad|>"
        self.template_opens_think = template_opens_think(self.tokenizer)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.model_uri,
            "dtype": self.dtype,
            "device": str(self.device),
            "sampling": self.sampling_settings(),
        }

    def sampling_settings(self) -> dict[str, Any]:
        """The generate settings in effect, and the checkpoint's sampling fields they replaced."""
        g = self.model.generation_config
        return {
            "do_sample": bool(g.do_sample),
            "temperature": g.temperature if g.do_sample else 0.0,
            "top_p": g.top_p if g.do_sample else None,
            "top_k": "off" if not g.top_k else g.top_k,
            "repetition_penalty": g.repetition_penalty,
            "eos_token_id": list(self.eos_ids),
            "ignored_checkpoint_generation_config": dict(self.ignored_generation_config),
        }

    def close(self) -> None:
        self.model = None

    def _prompt(self, row: Mapping[str, Any]) -> str:
        text = self.tokenizer.apply_chat_template(
            chat_messages(row, self.protocol.prompting), tokenize=False, add_generation_prompt=True
        )
        return text + THINK_PREFILL if self.protocol.prefill_think else text

    def generate(self, rows: list[dict[str, Any]], seeds: list[int]) -> list[list[Generation]]:
        out: list[list[Generation]] = [[] for _ in seeds]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            prompts = [self._prompt(r) for r in chunk]
            for s, seed in enumerate(seeds):
                out[s].extend(self._generate_chunk(chunk, prompts, seed))
        return out

    def _generate_chunk(self, rows: list[dict[str, Any]], prompts: list[str], seed: int) -> list[Generation]:
        p = self.protocol
        opened = self.template_opens_think or p.prefill_think
        texts, tokens, finishes = self._run(rows, prompts, p.max_new_tokens, seed)
        gens = []
        forced_idx = []
        for i, (text, n, finish) in enumerate(zip(texts, tokens, finishes, strict=True)):
            full = (THINK_PREFILL + text) if opened and THINK_OPEN not in text[:32] else text
            gens.append(Generation(full, n, 0, finish))
            if p.force_end and finish == "length" and still_thinking(full):
                forced_idx.append(i)
        if forced_idx:
            # Continue each budget-exhausted reply from its own text + the cue, as one more batch.
            sub = [rows[i] for i in forced_idx]
            cont_prompts = [prompts[i] + texts[i] + FORCE_CUE for i in forced_idx]
            c_texts, c_tokens, _ = self._run(sub, cont_prompts, p.force_tokens, seed)
            for i, c_text, c_n in zip(forced_idx, c_texts, c_tokens, strict=True):
                g = gens[i]
                g.text = g.text + FORCE_CUE + c_text
                g.completion_tokens += c_n
                g.forced_end = True
                g.finish_reason = "forced"
        for i, g in enumerate(gens):
            if g.forced_end:
                # Every token of the first pass was reasoning: count it exactly, not by re-tokenizing.
                g.reasoning_tokens = tokens[i]
                continue
            span = reasoning_span(g.text)[0]
            g.reasoning_tokens = (
                len(self.tokenizer(span, add_special_tokens=False)["input_ids"]) if span else 0
            )
        return gens

    def _run(
        self, rows: list[dict[str, Any]], texts: list[str], max_new_tokens: int, seed: int
    ) -> tuple[list[str], list[int], list[str]]:
        import torch

        extra: dict[str, Any] = {}
        if any(r.get("images") for r in rows):
            if not self.supports_images:
                raise ConfigError(f"{self.model_uri} is a text-only model: it cannot answer image questions")
            texts, extra = self._with_images(rows, texts)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        if extra:
            # Qwen2.5-VL builds its 3-D (mrope) image positions only when told which tokens are
            # image tokens; without this it silently falls back to 1-D positions for the image.
            image_token_id = getattr(self.model.config, "image_token_id", None)
            extra["mm_token_type_ids"] = (enc["input_ids"] == image_token_id).to(torch.int32)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        extra = {k: v.to(self.device) for k, v in extra.items()}
        torch.manual_seed(seed)  # one seed per (batch, protocol seed): reruns sample the same replies
        with torch.inference_mode():
            # Sampling, eos and pad come from the protocol's generation_config set in __init__.
            out = self.model.generate(**enc, **extra, max_new_tokens=max_new_tokens)
        new = out[:, enc["input_ids"].shape[1] :]
        result_texts, counts, finishes = [], [], []
        for ids in new.tolist():
            kept, finish = cut_at_stop(ids, self.eos_ids, self.tokenizer.pad_token_id)
            result_texts.append(self.tokenizer.decode(kept, skip_special_tokens=True))
            counts.append(len(kept))
            finishes.append(finish)
        return result_texts, counts, finishes

    def _with_images(self, rows: list[dict[str, Any]], texts: list[str]) -> tuple[list[str], dict[str, Any]]:
        import io

        import torch
        from PIL import Image

        from training.data import fit_pixels

        pil = []
        for r in rows:
            for im in r.get("images") or []:
                with Image.open(io.BytesIO(storage.read_bytes(im["uri"]))) as img:
                    pil.append(fit_pixels(img.convert("RGB"), self.max_pixels))
        out = self.image_processor(images=pil, return_tensors="pt")
        merge = getattr(self.image_processor, "merge_size", 2) or 2
        counts = iter(int(g.prod()) // (merge * merge) for g in out["image_grid_thw"])
        expanded = []
        for text in texts:
            pieces = text.split(self.image_token)
            rebuilt = pieces[0]
            for piece in pieces[1:]:
                rebuilt += self.image_token * next(counts) + piece
            expanded.append(rebuilt)
        return expanded, {
            "pixel_values": out["pixel_values"],
            "image_grid_thw": torch.as_tensor(out["image_grid_thw"]),
        }


def eos_token_ids(*sources: Any) -> list[int]:
    """Every end token id named by ``sources`` (ints, lists of ints or None), first occurrence order."""
    out: list[int] = []
    for src in sources:
        for t in src if isinstance(src, (list, tuple)) else [src]:
            if t is not None and int(t) not in out:
                out.append(int(t))
    return out


def cut_at_stop(ids: list[int], eos_ids: list[int], pad_token_id: int | None) -> tuple[list[int], str]:
    """Generated ids up to the first end token (any of ``eos_ids``) and ``stop``, else all and ``length``."""
    stops = set(eos_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return [x for x in ids[:i] if x != pad_token_id], "stop"
    return [x for x in ids if x != pad_token_id], "length"


def protocol_generation_config(
    protocol: SamplingProtocol, *, eos_ids: list[int], pad_token_id: int | None, bos_token_id: int | None
) -> Any:
    """A fresh ``GenerationConfig`` from the protocol alone: top-k off, no repetition penalty.

    transformers fills every field left unset from the model's own generation_config and then
    from its global defaults (``top_k=50``), so the neutral values are set explicitly.
    """
    from transformers import GenerationConfig

    sampling: dict[str, Any] = {"do_sample": False}
    if protocol.temperature > 0:
        sampling = {"do_sample": True, "temperature": protocol.temperature, "top_p": protocol.top_p}
    return GenerationConfig(
        **sampling,
        top_k=0,  # 0 = no top-k filter (transformers adds TopK only for top_k not in (None, 0))
        repetition_penalty=1.0,
        num_beams=1,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
    )
