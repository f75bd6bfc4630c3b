"""Sequence packing: isolation proved numerically, labels, predicted lengths, bin packing, SFT runs.

The isolation tests compare the logits of a packed row with the logits of each example run
alone. Each also runs the same packed row WITHOUT the per-example position reset and checks
that the logits then differ, so the comparison is shown able to fail.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.export import LLAMAFACTORY_SCHEMA
from octomed_data.job_config import TrainConfig
from octomed_data.schema import RecordError
from tests.support.sft import png, question, run_sft, training_rows
from training.data import IGNORE_INDEX, encode_conversation, expand_images, normalize_messages
from training.packed_collator import PackedCollator, mrope_positions
from training.packing import (
    LengthModel,
    best_fit_decreasing,
    image_token_count,
    iter_packs,
    pack_examples,
    packed_batch_plan,
)

ATOL = 1e-5


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory) -> Path:
    from training.tiny import build_text_model

    return build_text_model(tmp_path_factory.mktemp("pack") / "text")


@pytest.fixture(scope="module")
def vl_model_dir(tmp_path_factory) -> Path:
    from training.tiny import build_vl_model

    return build_vl_model(tmp_path_factory.mktemp("pack") / "vl")


def _example(tokenizer, question: str, answer: str, images: list[dict] | None = None) -> dict:
    images = images or []
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    messages = normalize_messages(
        [{"role": "user", "content": content}, {"role": "assistant", "content": answer}], len(images)
    )
    enc = encode_conversation(tokenizer, messages)
    return {"input_ids": enc.input_ids, "labels": enc.labels, "images": images}


def _text_examples(tokenizer) -> list[dict]:
    return [
        _example(tokenizer, "Which drug? " * n, "<think>Step.</think>Final answer: A " * k)
        for n, k in [(2, 1), (9, 3), (5, 2), (1, 1)]
    ]


# --------------------------------------------------------------------------- bin packing


def test_bin_packing_places_every_example_exactly_once_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(7.0, 0.8, size=5000).astype(int) + 1, 4096)
    packing = pack_examples(lengths, 4096, seed=7, window=512)
    assert sorted(packing.order.tolist()) == list(range(len(lengths)))  # never dropped, never duplicated
    assert len(packing) == len(packing.bounds) - 1 and packing.bounds[-1] == len(lengths)
    for i in range(len(packing)):
        members = packing.pack(i)
        assert members and int(lengths[members].sum()) == packing.tokens[i] <= 4096
    assert packing.fill > 0.95 and packing.mean_examples_per_pack > 2
    again = pack_examples(lengths, 4096, seed=7, window=512)
    assert np.array_equal(again.order, packing.order) and np.array_equal(again.bounds, packing.bounds)
    other = pack_examples(lengths, 4096, seed=8, window=512)
    assert not np.array_equal(other.order, packing.order)
    # Best fit: the 3 goes into the bin with 3 left, not the first bin with room.
    assert best_fit_decreasing([6, 7, 3], 10) == [[1, 2], [0]]
    with pytest.raises(ValueError, match="exceeds the capacity"):
        best_fit_decreasing([11], 10)

    # Streaming: bounded buffer, same guarantee; unreadable examples counted, not packed.
    def length_of(ex):
        if ex["i"] % 100 == 0:
            raise RecordError("bad_image", "x")
        return int(lengths[ex["i"]])

    errors: Counter = Counter()
    packs = list(
        iter_packs(({"i": i} for i in range(2000)), length_of, 4096, seed=1, window=300, errors=errors)
    )
    seen = [ex["i"] for pack in packs for ex in pack]
    assert sorted(seen) == [i for i in range(2000) if i % 100] and errors == {"bad_image": 20}
    assert all(sum(int(lengths[ex["i"]]) for ex in pack) <= 4096 for pack in packs)
    again = list(iter_packs(({"i": i} for i in range(2000)), length_of, 4096, seed=1, window=300))
    assert [[ex["i"] for ex in p] for p in again] == [[ex["i"] for ex in p] for p in packs]


def test_packed_batch_plan_counts_examples():
    plan = packed_batch_plan(512, 8.0, per_device_batch_size=2, world_size=8)
    assert (plan.packs_per_step, plan.gradient_accumulation_steps, plan.examples_per_step) == (64, 4, 512.0)
    plan = packed_batch_plan(512, 7.3, per_device_batch_size=1, world_size=8)  # 70.1 packs -> 72
    assert plan.packs_per_step == 72 and plan.gradient_accumulation_steps == 9
    assert plan.examples_per_step == pytest.approx(72 * 7.3)
    plan = packed_batch_plan(512, 100.0, per_device_batch_size=1, world_size=8)  # at least 1 pack per device
    assert plan.packs_per_step == 8 and plan.gradient_accumulation_steps == 1
    with pytest.raises(ConfigError, match="must be > 0"):
        packed_batch_plan(512, 0.0, 1, 1)


# --------------------------------------------------------------------------- isolation, text


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_per_example_logits_text(text_model_dir, attn):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.masking_utils import find_packed_sequence_indices

    tokenizer = AutoTokenizer.from_pretrained(str(text_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(text_model_dir), attn_implementation=attn).eval()
    assert model.config._attn_implementation == attn
    examples = _text_examples(tokenizer)
    lengths = [len(e["input_ids"]) for e in examples]
    for flatten in (False, True):
        collator = PackedCollator(pad_token_id=tokenizer.pad_token_id, max_seq_len=512, flatten=flatten)
        batch = collator([{"examples": examples[:3]}, {"examples": examples[3:]}])
        assert int(batch.pop("num_examples")) == 4 and "attention_mask" not in batch
        assert batch["input_ids"].shape == (1, sum(lengths)) if flatten else (2, sum(lengths[:3]))
        # What transformers will see: one segment per example (plus one for row 2's padding).
        segments = find_packed_sequence_indices(batch["position_ids"])
        assert segments[0, -1].item() == (3 if flatten else 2)
        with torch.no_grad():
            packed = model(**batch).logits
            alone = [
                model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in examples
            ]
            spans = [(0, 0, lengths[0]), (0, lengths[0], lengths[0] + lengths[1])]
            spans.append((0, lengths[0] + lengths[1], sum(lengths[:3])))
            spans.append((0, sum(lengths[:3]), sum(lengths)) if flatten else (1, 0, lengths[3]))
            for (row, a, b), ref in zip(spans, alone, strict=True):
                torch.testing.assert_close(packed[row, a:b], ref, atol=ATOL, rtol=0)
            # The same row without the per-example position reset: later examples see earlier ones.
            leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
            row, a, b = spans[1]
            assert (leaky[row, a:b] - alone[1]).abs().max() > 1e-2
            # And with a KV cache transformers skips the packed mask: why the batch says use_cache=False.
            cached = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True
            ).logits
            assert (cached[row, a:b] - alone[1]).abs().max() > 1e-2


def test_packed_labels_only_assistant_tokens_and_boundaries(text_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(text_model_dir))
    examples = _text_examples(tokenizer)
    batch = PackedCollator(pad_token_id=tokenizer.pad_token_id, max_seq_len=512)(
        [{"examples": examples[:3]}, {"examples": examples[3:]}]
    )
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    learned = labels != IGNORE_INDEX
    assert (labels[learned] == ids[learned]).all()  # a label is always the token itself
    starts = pos == 0
    assert not learned[starts].any()  # -100 at every example's (and the padding's) first token
    for row, members in ((0, examples[:3]), (1, examples[3:])):
        text = tokenizer.decode(ids[row][learned[row]].tolist())
        want = "".join(
            tokenizer.decode([t for t, lab in zip(e["input_ids"], e["labels"], strict=True) if lab != -100])
            for e in members
        )
        assert text == want and "Which drug" not in text and "system" not in text
    n = len(examples[3]["input_ids"])
    assert (ids[1, n:] == tokenizer.pad_token_id).all() and not learned[1, n:].any()
    # A label on an example's first token (e.g. a conversation opening with an assistant turn)
    # would be predicted from the previous example's last token: the collator removes it.
    forced = dict(examples[1], labels=list(examples[1]["input_ids"]))
    batch = PackedCollator(pad_token_id=tokenizer.pad_token_id, max_seq_len=512)(
        [{"examples": [examples[0], forced]}]
    )
    assert batch["labels"][0, len(examples[0]["input_ids"])] == IGNORE_INDEX
    with pytest.raises(ConfigError, match="exceeds max_seq_len"):
        PackedCollator(pad_token_id=0, max_seq_len=40)([{"examples": examples[:2]}])


# --------------------------------------------------------------------------- Qwen2.5-VL


def _image_ref(path: Path) -> dict:
    return {"bytes": path.read_bytes(), "path": str(path)}


def test_predicted_image_lengths_equal_collator_lengths(vl_model_dir, shared_data):
    from transformers import AutoTokenizer

    from training.models import load_image_processor

    tokenizer = AutoTokenizer.from_pretrained(str(vl_model_dir))
    processor = load_image_processor(vl_model_dir)
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    real = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[:4]
    real += sorted((shared_data / "omnimedvqa").rglob("*.png"))[:2]
    assert len(real) >= 5
    refs = [_image_ref(p) for p in real]
    # Synthetic extremes: tiny (scaled up to min_pixels), very wide, odd sizes.
    for size in [(20, 20), (1000, 30), (57, 999), (333, 217)]:
        buf = io.BytesIO()
        Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
        refs.append({"bytes": buf.getvalue(), "path": None})
    for max_pixels in (262144, 96 * 96):
        model = LengthModel(8192, processor, image_token, max_pixels)
        for ref in refs:
            ex = _example(tokenizer, "What is shown?", "A lesion.", [ref])
            _, grid, ids, _ = expand_images(
                ex["input_ids"], ex["labels"], [ref], processor, image_token, max_pixels, 8192
            )
            assert model(ex["input_ids"], ex["labels"], [ref]) == len(ids)
            with Image.open(io.BytesIO(ref["bytes"])) as im:
                assert image_token_count(*im.size, processor, max_pixels) == int(grid.prod()) // 4
        two = _example(tokenizer, "Compare.", "Same.", refs[:2])
        ids = expand_images(
            two["input_ids"], two["labels"], refs[:2], processor, image_token, max_pixels, 8192
        )[2]
        assert model(two["input_ids"], two["labels"], refs[:2]) == len(ids)
    # Rows that can't be trained are refused with a reason (counted by the trainer), not crashed on.
    model = LengthModel(64, processor, image_token, 262144)
    ex = _example(tokenizer, "Q", "A", [refs[0]])
    with pytest.raises(RecordError) as exc:
        model(ex["input_ids"], ex["labels"], [refs[0]])
    assert exc.value.reason == "image_exceeds_max_seq_len"
    with pytest.raises(RecordError) as exc:
        LengthModel(8192, processor, image_token)(
            ex["input_ids"], ex["labels"], [{"bytes": b"junk", "path": "x"}]
        )
    assert exc.value.reason == "bad_image"


def test_packed_logits_equal_per_example_logits_vl(vl_model_dir, shared_data):
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.masking_utils import find_packed_sequence_indices

    from training.models import load_image_processor

    tokenizer = AutoTokenizer.from_pretrained(str(vl_model_dir))
    processor = load_image_processor(vl_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(str(vl_model_dir)).eval()
    image_token = model.config.image_token_id
    images = [_image_ref(p) for p in sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[:3]]
    examples = [
        _example(tokenizer, "What organ is shown?", "<think>Look.</think>Liver.", images[:1]),
        _example(tokenizer, "Which drug? " * 3, "Final answer: A"),  # text-only example in a VL pack
        _example(tokenizer, "Compare the two scans.", "The second shows a mass. " * 2, images[1:3]),
    ]
    collator = PackedCollator(
        pad_token_id=tokenizer.pad_token_id, max_seq_len=4096, image_processor=processor,
        image_token_id=image_token, mrope=True, spatial_merge_size=2,
    )  # fmt: skip
    batch = collator([{"examples": examples}])
    assert int(batch.pop("num_examples")) == 3
    assert batch["position_ids"].shape == (4, 1, batch["input_ids"].shape[1])
    assert find_packed_sequence_indices(batch["position_ids"][0])[0, -1].item() == 2
    with torch.no_grad():
        packed = model(**batch).logits[0]
        offset = 0
        for ex in examples:
            if ex["images"]:
                pv, grid, ids, _ = expand_images(
                    ex["input_ids"], ex["labels"], ex["images"], processor, image_token, 262144, 4096
                )
                ids_t = torch.tensor([ids])
                types = (ids_t == image_token).int()
                # The model's own mrope positions for this example alone are what we computed.
                rope, _ = model.model.get_rope_index(ids_t, types, image_grid_thw=grid)
                assert np.array_equal(rope[:, 0].numpy(), mrope_positions(ids, grid.tolist(), image_token, 2))
                alone = model(
                    input_ids=ids_t,
                    pixel_values=pv,
                    image_grid_thw=grid,
                    mm_token_type_ids=types,
                    use_cache=False,
                ).logits[0]
            else:
                ids = ex["input_ids"]
                alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[offset : offset + len(ids)], alone, atol=ATOL, rtol=0)
            offset += len(ids)
        assert offset == batch["input_ids"].shape[1]
        # Without the text row (3-D mrope positions only) transformers finds no packing: leak.
        leaky = model(**{**batch, "position_ids": batch["position_ids"][1:]}).logits[0]
        assert (leaky - packed).abs().max() > 1e-2
        # Text row not reset: same leak.
        flat = batch["position_ids"].clone()
        flat[0] = torch.arange(flat.shape[-1])
        assert (model(**{**batch, "position_ids": flat}).logits[0] - packed).abs().max() > 1e-2


# --------------------------------------------------------------------------- SFT runs


def test_sft_with_packing_trains_every_row(text_model_dir, tmp_path):
    """Packing on (the default) through ``python -m training.sft``: every usable row once per epoch."""
    export = storage.Dataset(str(tmp_path / "export"), LLAMAFACTORY_SCHEMA)
    rows = training_rows(13)
    for i, row in enumerate(rows):  # varied lengths, so packs hold different numbers of examples
        row["messages"][-1]["content"] = "<think>" + "Reason. " * (1 + 3 * (i % 5)) + "</think>\\boxed{A}"
    malformed = {"messages": [{"role": "user", "content": "no reply"}], "images": [], "question_id": "bad"}
    export.write_shard(0, rows + [{**malformed, "source": "s", "teacher": "t"}])
    cfg = {
        "train_data": [export.uri],
        "model_path": str(text_model_dir),
        "output_uri": str(tmp_path / "ckpt"),
        "global_batch_size": 8,
        "per_device_batch_size": 1,
        "num_train_epochs": 2,
        "learning_rate": 1e-3,
        "max_seq_len": 1024,
        "zero_stage": 2,
        "logging_steps": 1,
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    result = run_sft(tmp_path / "train.yaml")
    info = result["packing"]
    assert TrainConfig(**cfg).packing and info["mode"] == "map" and info["examples"] == 13
    assert info["mean_examples_per_pack"] > 2 and info["fill"] > 0.5
    assert result["samples_seen"] == 2 * 13  # every row exactly once per epoch
    assert result["skipped"] == {"no_assistant_turn": 1}
    packs_per_epoch = info["packs"]
    assert (
        info["packs_per_step"]
        == info["gradient_accumulation_steps"]
        == max(1, round(8 / info["mean_examples_per_pack"]))
    )
    assert result["steps"] == 2 * math.ceil(packs_per_epoch / info["packs_per_step"])
    assert result["examples_per_step"] == info["examples_per_step"]
    assert all(math.isfinite(x) for x in result["losses"])
    marker = storage.read_json(str(tmp_path / "ckpt" / "checkpoint.json"))
    assert marker["packing"] == info and marker["examples_per_step"] == info["examples_per_step"]


def test_vl_streaming_packed_and_padded_runs(vl_model_dir, tmp_path):
    """Qwen2.5-VL with images: packing over the stream (bounded buffer), then ``packing: false``."""
    export = storage.Dataset(str(tmp_path / "export"), LLAMAFACTORY_SCHEMA)
    rows = []
    for i in range(8):
        image = str(tmp_path / "img" / f"scan{i}.png")
        storage.write_bytes(image, png(i, (56 + 28 * (i % 3), 84)))
        q = question(i, "yes", "vqa", task_type="yes_no_maybe", options=None)
        has_image = i % 4 != 0
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": ("<image>" if has_image else "") + q["question"]},
                    {"role": "assistant", "content": "<think>Look.</think>Final answer: yes"},
                ],
                "images": [image] if has_image else [],
                "question_id": f"q{i}",
                "source": "vqa",
                "teacher": "t",
            }
        )
    rows[5]["images"] = [str(tmp_path / "img" / "missing.png")]  # counted, not fatal
    export.write_shard(0, rows)
    cfg = {
        "train_data": [export.uri],
        "model_path": str(vl_model_dir),
        "output_uri": str(tmp_path / "ckpt"),
        "global_batch_size": 4,
        "per_device_batch_size": 1,
        "num_train_epochs": 1,
        "streaming": True,
        "packing_window": 4,
        "learning_rate": 1e-3,
        "max_seq_len": 512,
        "zero_stage": 2,  # (plain DDP, stage 0, fails on a micro-batch without images: unused vision weights)
        "logging_steps": 1,
        "max_pixels": 96 * 96,
    }
    (tmp_path / "vl.yaml").write_text(yaml.safe_dump(cfg))
    result = run_sft(tmp_path / "vl.yaml")
    info = result["packing"]
    assert info["mode"] == "streaming" and info["measured_on_first"]["examples"] == 4
    assert result["skipped"] == {"image_not_found": 1}
    assert result["samples_seen"] == 7 and all(math.isfinite(x) for x in result["losses"])

    # packing: false keeps the padded path (one row per example); the missing image is fatal there.
    rows[5]["images"] = [str(tmp_path / "img" / "scan5.png")]
    export.write_shard(0, rows)
    cfg.update({"packing": False, "streaming": False, "max_steps": 2, "output_uri": str(tmp_path / "padded")})
    (tmp_path / "padded.yaml").write_text(yaml.safe_dump(cfg))
    padded = run_sft(tmp_path / "padded.yaml")
    assert padded["packing"] is None and padded["samples_seen"] == 2 * 4 and padded["examples_per_step"] == 4
