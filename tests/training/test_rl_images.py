"""GRPO on the RL data's image prompts (issue 27): a vision-language policy (a tiny random
Qwen2.5-VL) trains on them and its vision tower sees their images; a text-only policy leaves them
out and counts them.

The RL rows are written as the RL data step writes them (RL_SCHEMA, the SFT student's prompt from
:func:`octomed_data.rl.data.prompt_messages`, image URIs in a run's image store) around real
VQA-RAD radiographs, stored content-addressed as ingestion stores them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from octomed_data import storage
from octomed_data.images import fingerprint, open_raster
from octomed_data.layout import CheckpointFolder
from octomed_data.rl.data import RL_SCHEMA, image_uris, prompt_messages
from octomed_data.schema import question_row
from training.rl import RLJob, load_prompts, train_grpo

# Real VQA-RAD items (image, question, answer) of /work/shared/data/vqa_rad.
VQA_RAD = [
    ("synpic54610.jpg", "Are regions of the brain infarcted?", "yes"),
    ("synpic42202.jpg", "Is there evidence of an aortic aneurysm?", "yes"),
]
NUM_GENERATIONS = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from training.tiny import build_text_model, build_vl_model

    root = tmp_path_factory.mktemp("rl-images")
    return {"vl": build_vl_model(root / "vl"), "text": build_text_model(root / "text")}


def _stored(store: str, path: Path) -> dict:
    data, sha, phash = fingerprint(open_raster(str(path)))
    uri = storage.join(store, "images", f"{sha}.png")
    storage.write_bytes(uri, data)
    return {"sha256": sha, "uri": uri, "phash": phash, "width": 0, "height": 0}


def _rl_row(q: dict) -> dict:
    return {
        "question_id": q["question_id"],
        "source": q["source"],
        "task_type": q["task_type"],
        "split": "train",
        "prompt": prompt_messages(q),
        "images": image_uris(q),
        "gold_answer": q["answer"],
        "question": q["question"],
        "answer_text": q.get("answer_text"),
        "options": q["options"],
        "pass_rate": 0.5,
        "samples": 4,
    }


@pytest.fixture
def rl_data(tmp_path: Path, shared_data: Path) -> Path:
    """Two VQA-RAD image prompts and one text prompt (all closed yes/no), in one RL data shard."""
    store = str(tmp_path / "store")
    qs = [
        question_row(
            source="vqa_rad",
            split="train",
            task_type="yes_no_maybe",
            question=question,
            answer=answer,
            input_file="VQA_RAD_Dataset_Public.json",
            record_index=i,
            images=[_stored(store, shared_data / "vqa_rad" / "images" / name)],
        )
        for i, (name, question, answer) in enumerate(VQA_RAD)
    ]
    qs.append(
        question_row(
            source="synthetic_closed",
            split="train",
            task_type="yes_no_maybe",
            question="Does the fictional agent Zentral-1 thin the blood?",
            answer="yes",
            input_file="synthetic.jsonl",
            record_index=9,
        )
    )
    table = pa.Table.from_pylist([_rl_row(q) for q in qs], schema=RL_SCHEMA)
    storage.Dataset(str(tmp_path / "rl-data"), RL_SCHEMA).write_shard(0, table)
    return tmp_path


def _job(tmp: Path, model: Path, **trainer) -> RLJob:
    out = str(tmp / "rl" / "checkpoints")
    return RLJob(
        model_uri=str(model),
        data_uri=str(tmp / "rl-data"),
        output_uri=out,
        metrics_uri=str(tmp / "rl" / "metrics.jsonl"),
        plot_uri=str(tmp / "rl" / "rl.png"),
        work_dir=str(tmp / "work"),
        # One step: all three prompts (two with images) in one batch, NUM_GENERATIONS rollouts each.
        trainer={"max_steps": 1, "num_generations": NUM_GENERATIONS, "per_device_train_batch_size": 6}
        | {"max_completion_length": 6, "save_steps": 1}
        | trainer,
        inputs={"sft": {"uri": "s", "created_at": "t1"}, "rl_data": "d1"},
    )


def _expected_grids(job: RLJob, model: Path) -> list[list[int]]:
    """The (t, h, w) patch grid of each image prompt's image, as SFT's image path gives it."""
    from training.data import fit_pixels, load_image
    from training.models import load_image_processor

    processor = load_image_processor(model)
    grids = []
    for row in storage.Dataset(job.data_uri).iter_rows():
        for uri in row["images"]:
            image = fit_pixels(load_image({"bytes": None, "path": uri}), job.max_pixels)
            grids.append(processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist())
    return grids


def test_a_vision_language_policy_trains_on_image_prompts_and_sees_their_images(
    rl_data: Path, models: dict[str, Path], monkeypatch
) -> None:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    tower = modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel
    seen: list[list[list[int]]] = []
    forward = tower.forward

    def recording(self, hidden_states, grid_thw, **kwargs):
        seen.append(grid_thw.tolist())  # the images of one model call, as (t, h, w) patch grids
        return forward(self, hidden_states, grid_thw, **kwargs)

    monkeypatch.setattr(tower, "forward", recording)
    # Qwen2.5-VL places each image by its token types (mm_token_type_ids): in every model call they
    # must mark exactly the image pads of input_ids (a pad on the wrong side would give an image's
    # 3-D positions to text tokens, or fail once a batch's prompts differ in length).
    model_cls = modeling_qwen2_5_vl.Qwen2_5_VLModel
    rope_index = model_cls.get_rope_index
    misplaced: list[int] = []

    def checked(self, input_ids=None, mm_token_type_ids=None, *args, **kwargs):
        pads = input_ids == self.config.image_token_id
        misplaced.append(int(((mm_token_type_ids == 1) != pads).sum()))
        return rope_index(self, input_ids, mm_token_type_ids, *args, **kwargs)

    monkeypatch.setattr(model_cls, "get_rope_index", checked)
    job = _job(rl_data, models["vl"])
    result = train_grpo(job)

    assert result["steps"] == 1 and not result["trained_already"]
    assert result["prompts"] == 3 and result["image_prompts"] == 2
    assert result["skipped"]["image_prompt"] == 0 and result["image_prompts_left_out"] == 0
    assert sum(result["skipped"].values()) == 0
    # The vision tower ran (rollouts, log-probs, loss), each time on every rollout's image:
    # both image prompts' own images, NUM_GENERATIONS times each, beside the text prompt's rollouts.
    want = sorted(_expected_grids(job, models["vl"]) * NUM_GENERATIONS)
    assert len(want) == 2 * NUM_GENERATIONS
    assert len(seen) >= 2 and all(sorted(call) == want for call in seen), (seen, want)
    assert misplaced and not any(misplaced), misplaced
    metrics = [json.loads(x) for x in storage.read_bytes(job.metrics_uri).decode().splitlines()]
    assert [m["step"] for m in metrics] == [1] and "pass_rate" in metrics[0]
    # The checkpoint stays a vision-language model with its image processor (evaluable as one).
    marker = storage.read_json(CheckpointFolder(job.output_uri).marker)
    assert marker["final"] and marker["config_hash"] == job.config_hash()
    assert {"preprocessor_config.json", "config.json"} <= set(marker["files"])
    cfg = json.loads(storage.read_bytes(storage.join(job.output_uri, "config.json")))
    assert cfg["model_type"] == "qwen2_5_vl"
    # Exactly once: the same job again trains nothing (the vision tower is not called again).
    calls = len(seen)
    assert train_grpo(job)["trained_already"] and len(seen) == calls
    # The images' size is a setting: another max_pixels is another job.
    assert job.model_copy(update={"max_pixels": 50176}).config_hash() != job.config_hash()


def test_an_image_prompts_length_counts_its_image_tokens_and_its_images_go_first(
    rl_data: Path, models: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    from training.rl_vision import image_prompt_tokens, prompt_tokens, vl_processor

    tokenizer = AutoTokenizer.from_pretrained(str(models["vl"]))
    processor = vl_processor(models["vl"], tokenizer)
    job = _job(rl_data, models["vl"])
    dataset, skipped = load_prompts(job, tokenizer, processor.image_processor)
    rows = [dataset[i] for i in range(len(dataset))]
    assert sum(skipped.values()) == 0 and sorted(len(r["images"]) for r in rows) == [0, 1, 1]
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    raw = {r["question_id"]: r for r in storage.Dataset(job.data_uri).iter_rows()}
    for row in rows:
        if not row["images"]:
            assert row["prompt"] == raw[row["question_id"]]["prompt"]  # a text prompt as it was
            continue
        user = row["prompt"][-1]
        assert user["role"] == "user" and [p["type"] for p in user["content"]] == ["image", "text"]
        assert user["content"][1]["text"] == raw[row["question_id"]]["prompt"][-1]["content"]
        assert max(row["images"][0].size) > 28 and row["images"][0].mode == "RGB"
        # What TRL does with the row: the images into the placeholders, the processor's template.
        filled = [dict(m) for m in row["prompt"]]
        filled[-1] = {**user, "content": [{"type": "image", "image": row["images"][0]}, user["content"][1]]}
        out = processor.apply_chat_template(
            conversation=[filled], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        ids = out["input_ids"][0]
        pads = int(out["image_grid_thw"].prod()) // 4  # merge size 2
        assert ids.count(pad) == pads > 1 and "pixel_values" in out
        counted = image_prompt_tokens(tokenizer, raw[row["question_id"]]["prompt"], raw[row["question_id"]]["images"],
                                      processor.image_processor, job.max_pixels)  # fmt: skip
        assert counted == len(ids)

    # max_prompt_length counts the image tokens: a limit every prompt's text fits under (one pad
    # per image) leaves the image prompts out, counted, as their images make them longer.
    def length(r: dict) -> int:
        if not r["images"]:
            return prompt_tokens(tokenizer, r["prompt"])
        return image_prompt_tokens(
            tokenizer, r["prompt"], r["images"], processor.image_processor, job.max_pixels
        )

    limit = max(prompt_tokens(tokenizer, r["prompt"]) + len(r["images"]) for r in raw.values())
    assert all(length(r) > limit for r in raw.values() if r["images"])
    short = _job(rl_data, models["vl"], max_prompt_length=limit)
    kept, skipped = load_prompts(short, tokenizer, processor.image_processor)
    want = sorted(q for q, r in raw.items() if length(r) <= limit)
    assert sorted(kept.data.column("question_id").to_pylist()) == want
    assert skipped["prompt_too_long"] == len(raw) - len(want)
    assert len(want) == 1 and not raw[want[0]]["images"] and skipped["prompt_too_long"] == 2


def test_an_image_missing_from_the_store_leaves_its_prompt_out_counted(rl_data: Path, models) -> None:
    from transformers import AutoTokenizer

    from training.models import load_image_processor

    tokenizer = AutoTokenizer.from_pretrained(str(models["vl"]))
    gone = next(r for r in storage.Dataset(str(rl_data / "rl-data")).iter_rows() if r["images"])
    Path(gone["images"][0]).unlink()
    dataset, skipped = load_prompts(
        _job(rl_data, models["vl"]), tokenizer, load_image_processor(models["vl"])
    )
    assert len(dataset) == 2 and skipped["image_not_found"] == 1
    assert gone["question_id"] not in dataset.data.column("question_id").to_pylist()


def test_a_text_only_policy_leaves_image_prompts_out_and_counts_them(rl_data: Path, models) -> None:
    job = _job(rl_data, models["text"], per_device_train_batch_size=2)
    result = train_grpo(job)
    assert result["steps"] == 1 and result["prompts"] == 1 and result["image_prompts"] == 0
    assert result["skipped"]["image_prompt"] == 2 and result["image_prompts_left_out"] == 2
    marker = storage.read_json(CheckpointFolder(job.output_uri).marker)
    assert marker["skipped"]["image_prompt"] == 2


def test_the_run_s_job_sees_images_at_the_sft_size_and_that_size_is_a_setting(rl_data: Path) -> None:
    from octomed_data.layout import RLFolder
    from octomed_data.recipe import Recipe, load_recipe
    from octomed_data.runs import start_run
    from training.rl_stage import rl_job

    def job_of(max_pixels: int | None, run_id: str) -> RLJob:
        data = load_recipe("demo").model_dump(mode="json")
        if max_pixels is not None:
            data["training"]["config"] = data["training"].get("config", {}) | {"max_pixels": max_pixels}
        recipe = Recipe.model_validate(data)
        paths = start_run(recipe, run_id, str(rl_data / "store-runs"))
        storage.write_bytes(CheckpointFolder(paths.checkpoints).marker, b'{"final": true, "created_at": "t"}')
        rows = storage.Dataset(str(rl_data / "rl-data")).read_all()
        storage.Dataset(RLFolder(paths.rl).split("train"), RL_SCHEMA).write_shard(0, rows)
        return rl_job(recipe, paths, sft_checkpoint=paths.checkpoints, work_dir=str(rl_data / "w"))

    default, smaller = job_of(None, "a"), job_of(200704, "b")
    assert default.max_pixels == 262144 and smaller.max_pixels == 200704  # training.config.max_pixels
    assert default.settings()["images"] == {"handling": 1, "max_pixels": 262144}
    assert smaller.config_hash() != default.model_copy(update={"inputs": smaller.inputs}).config_hash()
