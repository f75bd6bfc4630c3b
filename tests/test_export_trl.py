"""The TRL export with the real TRL: SFTTrainer, assistant-only loss, one step, text model and VLM.

The export is copied alone to another folder (the run is deleted) and loaded by configuration
name from its dataset card, as a user would; the masked tokens must be exactly the assistant turns.
"""

from __future__ import annotations

import re
import shutil

import pytest
import trl

from octomed_data.export import export
from octomed_data.mixture import MixtureConfig, build_mixture
from octomed_data.prompts import FINAL_ANSWER_LINE
from tests.support.export import load_config
from tests.support.orchestration import write_inputs

IGNORE = -100
# The tiny models' Qwen2.5 template with {% generation %} markers around each assistant turn
# (its <|im_end|> included, so the model learns to stop), as assistant_only_loss requires.
GENERATION_TEMPLATE = (
    "{%- macro content(c) -%}{%- if c is string -%}{{ c }}{%- else -%}{%- for part in c -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ content(message['content']) }}{{ '<|im_end|>' }}{%- endgeneration -%}{{ '\\n' }}"
    "{%- else -%}{{ content(message['content']) }}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@pytest.fixture(scope="module")
def trl_copy(shared_data, tmp_path_factory):
    """The TRL export folder copied alone elsewhere; the run that made it is deleted."""
    root = tmp_path_factory.mktemp("trl-run")
    accepted, questions = write_inputs(shared_data, str(root / "in"), n_text=6, n_image=2)
    mix = build_mixture(accepted, questions, str(root / "mix"), MixtureConfig(validation_fraction=0.25))
    export(mix.uri, str(root / "exp"), formats=["trl"], embed_images=True)  # a self-contained copy
    copy = tmp_path_factory.mktemp("elsewhere") / "trl"
    shutil.copytree(root / "exp" / "trl", copy)
    shutil.rmtree(root)
    return copy


def _assistant_text(messages) -> str:
    content = messages[-1]["content"]
    return content if isinstance(content, str) else "".join(p["text"] or "" for p in content)


def _assert_masked_exactly_assistant(tokenizer, input_ids, labels, messages) -> None:
    """Labels are set on one contiguous span: the assistant turn and its <|im_end|>, nothing else."""
    learned = [i for i, label in enumerate(labels) if label != IGNORE]
    assert learned, "no token is learned"
    assert learned == list(range(learned[0], learned[-1] + 1)), "learned tokens are not one span"
    assert [labels[i] for i in learned] == [input_ids[i] for i in learned]
    span = tokenizer.decode([input_ids[i] for i in learned], skip_special_tokens=False)
    assistant = _assistant_text(messages)
    assert span == assistant + "<|im_end|>"
    assert re.search(re.escape(FINAL_ANSWER_LINE.format(answer="@")).replace("@", "[A-E]") + "$", assistant)
    # Everything before the span is the prompt up to "<|im_start|>assistant\n".
    before = tokenizer.decode(input_ids[: learned[0]], skip_special_tokens=False)
    assert before.endswith("<|im_start|>assistant\n")


def _config(tmp_path, **kw):
    return trl.SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=4,
        assistant_only_loss=True,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        max_length=None,
        **kw,
    )


def test_trl_text_model_trains_on_text_configuration(trl_copy, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.tiny import build_text_model

    build_text_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    tokenizer.chat_template = GENERATION_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ds = load_config(trl_copy, "text", "train")
    assert "images" not in ds.column_names and isinstance(ds[0]["messages"][0]["content"], str)
    trainer = trl.SFTTrainer(
        model=model, args=_config(tmp_path), train_dataset=ds, processing_class=tokenizer
    )
    processed = trainer.train_dataset
    assert len(processed) == len(ds)
    for row in processed:
        _assert_masked_exactly_assistant(tokenizer, row["input_ids"], row["labels"], row["messages"])
    batch = trainer.data_collator([processed[i] for i in range(min(4, len(processed)))])
    for ids, labels, row in zip(
        batch["input_ids"].tolist(), batch["labels"].tolist(), processed, strict=False
    ):
        n = len(row["input_ids"])  # right padding: pads are never learned
        assert all(label == IGNORE for label in labels[n:])
        _assert_masked_exactly_assistant(tokenizer, ids[:n], labels[:n], row["messages"])
    out = trainer.train()
    assert out.global_step == 1 and out.training_loss > 0


def _tiny_vl_processor(model_dir, tokenizer):
    """Qwen2.5-VL processor from the PIL image processor (the video processor needs torchvision)."""
    from training.models import image_only_vl_processor_class, load_image_processor

    return image_only_vl_processor_class()(
        image_processor=load_image_processor(model_dir),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=GENERATION_TEMPLATE,
    )


def test_trl_vlm_trains_on_vision_configuration(trl_copy, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from training.tiny import build_vl_model

    build_vl_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    processor = _tiny_vl_processor(tmp_path / "model", tokenizer)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "model")
    ds = load_config(trl_copy, "vision", "train")
    text_rows = load_config(trl_copy, "text", "train")
    with_images = [i for i, row in enumerate(ds) if row["images"]]
    assert with_images and len(ds) - len(with_images) == len(text_rows)
    trainer = trl.SFTTrainer(
        model=model, args=_config(tmp_path), train_dataset=ds, processing_class=processor
    )
    # A mixed batch: image rows and a text row, through the trainer's own collator.
    picked = with_images[:2] + [next(i for i, row in enumerate(ds) if not row["images"])]
    examples = [trainer.train_dataset[i] for i in picked]
    batch = trainer.data_collator(examples)
    assert "pixel_values" in batch
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for ids, labels, mask, example in zip(
        batch["input_ids"].tolist(),
        batch["labels"].tolist(),
        batch["attention_mask"].tolist(),
        examples,
        strict=True,
    ):
        n = sum(mask)
        assert all(label == IGNORE for label in labels[n:])
        assert ids[:n].count(image_pad) > 0 if example["images"] else image_pad not in ids[:n]
        _assert_masked_exactly_assistant(tokenizer, ids[:n], labels[:n], example["messages"])
    out = trainer.train()
    assert out.global_step == 1 and out.training_loss > 0
