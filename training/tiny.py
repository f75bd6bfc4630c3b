"""Tiny Qwen-style models and tokenizer built offline, for tests and the demo.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained with ``tokenizers`` on
a small built-in corpus (plus any text you pass), carrying Qwen's special tokens and a Qwen2.5
chat template; the models are built from configs with random weights. The saved folder loads
with ``AutoTokenizer`` / ``AutoModelForCausalLM`` (text) or ``AutoModelForImageTextToText``
(Qwen2.5-VL), exactly like a real checkpoint, so training and evaluation code paths are the
real ones.

``octomed-data tiny-model OUT_DIR [--vl]`` builds one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

# Qwen2/2.5 special tokens (ids follow the vocabulary), plus the reasoning markers.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Not "special": decoding with skip_special_tokens must keep the reasoning markers.
REASONING_TOKENS = ["<think>", "</think>"]

# Qwen2.5-VL's chat template, reduced to what the factory uses: string or typed-part content,
# images as <|vision_start|><|image_pad|><|vision_end|>, default system prompt when none given.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)

_CORPUS = [
    "A 45-year-old man presents to the emergency department with chest pain radiating to the left arm.",
    "Which of the following is the most likely diagnosis? Answer with the letter of the correct option.",
    "The patient has a history of hypertension, diabetes mellitus and hyperlipidemia.",
    "Laboratory studies show elevated troponin, leukocytosis and a normal serum creatinine.",
    "Chest radiograph, CT scan, MRI of the brain, ultrasound of the abdomen, X-ray of the knee.",
    "Is there evidence of pneumothorax in this image? yes no maybe",
    "Let me think step by step about the mechanism, the pathophysiology and the treatment.",
    "The answer is (A). The answer is (B). The answer is (C). The answer is (D). The answer is (E).",
    "Final answer: yes. Final answer: no. Final answer: maybe.",
    "Myocardial infarction, pulmonary embolism, aortic dissection, pericarditis, pneumonia.",
    "Administer aspirin, start heparin, perform cardiac catheterization, obtain an ECG.",
    "Histology shows nests of malignant squamous cells with keratin pearls.",
    "0 1 2 3 4 5 6 7 8 9 10 100 mg mL mmHg kg/m2 %",
]


def default_corpus() -> list[str]:
    """The built-in training text for the tiny tokenizer."""
    return list(_CORPUS)


def build_tokenizer(
    out_dir: str | Path | None = None, corpus: Iterable[str] | None = None, vocab_size: int = 1024
):
    """Train a byte-level BPE tokenizer offline with Qwen's special tokens and chat template.

    Returns a ``PreTrainedTokenizerFast``; saves it to ``out_dir`` when given. Any byte string
    encodes (byte-level), so unseen text only costs more tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = default_corpus() + list(corpus or [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.add_tokens(REASONING_TOKENS, special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE
    # Qwen pads on the right for training; evaluation switches to left padding itself.
    fast.padding_side = "right"
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_text_model(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Build and save a tiny Qwen2 causal LM with its tokenizer to ``out_dir`` (random weights)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(str(out))
    _write_provenance(out, "qwen2-text", hidden_size, num_layers, seed)
    return out


def build_vl_model(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Build and save a tiny Qwen2.5-VL model, tokenizer and PIL image processor to ``out_dir``.

    The full Qwen2.5-VL processor insists on a video processor, which needs torchvision (not
    installable on CPU machines); the tokenizer and the PIL image processor are saved side by
    side instead and :mod:`training.vision` loads them separately.
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    torch.manual_seed(seed)
    heads = 4
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # head_dim 16 -> rotary half 8 = 2 + 3 + 3 (temporal, height, width)
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
            "tie_word_embeddings": True,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(str(out))
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64).save_pretrained(str(out))
    _write_provenance(out, "qwen2.5-vl", hidden_size, num_layers, seed)
    return out


def _write_provenance(out: Path, kind: str, hidden_size: int, num_layers: int, seed: int) -> None:
    # Makes it obvious to anyone opening the folder that these are random, untrained weights.
    (out / "TINY_MODEL.json").write_text(
        json.dumps(
            {
                "kind": kind,
                "hidden_size": hidden_size,
                "num_layers": num_layers,
                "seed": seed,
                "note": "random weights built offline by training.tiny for tests and demos",
            },
            indent=2,
        )
    )


def ensure_model(kind: str, out_dir: str) -> str:
    """The tiny ``kind`` model ("text" or "vl") at ``out_dir``, built there once (a recipe's ``tiny_model``)."""
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        (build_vl_model if kind == "vl" else build_text_model)(out_dir)
    return out_dir
