"""Training and evaluation entry points, on CPU with tiny models built offline.

DeepSpeed runs start in a subprocess (``python -m training.sft``), as a launcher would start them:
each gets a clean process group and environment. No run compiles DeepSpeed's shared-memory
inference kernel, which training never calls (``training.deepspeed_config.skip_inference_kernels``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from evaluation.harness import EvalResult, evaluate, reasoning_span
from octomed_data import storage
from octomed_data.errors import ConfigError
from octomed_data.export import LLAMAFACTORY_SCHEMA
from octomed_data.job_config import EvalConfig, TrainConfig, load_yaml_config
from octomed_data.schema import QUESTION_SCHEMA, RecordError
from tests.support.sft import png, question, run_sft, training_rows
from training.data import IGNORE_INDEX, SFTCollator, encode_conversation, normalize_messages
from training.deepspeed_config import deepspeed_config
from training.launch import launch_command
from training.sft import train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    from training.tiny import build_text_model

    return build_text_model(tmp_path_factory.mktemp("tiny") / "text")


@pytest.fixture(scope="module")
def tokenizer(tiny_text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_text), local_files_only=True)


# --------------------------------------------------------------------------- config


def test_global_batch_512_math(monkeypatch):
    base = {"train_data": ["x"], "model_path": "m", "output_uri": "o"}
    cfg = TrainConfig(**base)
    assert (cfg.num_train_epochs, cfg.global_batch_size, cfg.learning_rate) == (3.0, 512, 5e-5)
    assert (cfg.lr_scheduler_type, cfg.zero_stage, cfg.max_pixels) == ("cosine", 3, 262144)
    assert cfg.batch_plan(world_size=1).gradient_accumulation_steps == 512
    plan = TrainConfig(**base, per_device_batch_size=4).batch_plan(world_size=8)
    assert (plan.per_device_batch_size, plan.gradient_accumulation_steps, plan.world_size) == (4, 16, 8)
    assert plan.per_device_batch_size * plan.gradient_accumulation_steps * plan.world_size == 512
    monkeypatch.setenv("WORLD_SIZE", "16")  # what a launcher sets
    assert TrainConfig(**base, per_device_batch_size=2).batch_plan().gradient_accumulation_steps == 16
    # Padded batches must divide 512 exactly; packed ones are planned from examples per pack.
    with pytest.raises(ConfigError, match="not a multiple of per_device_batch_size 3 x world_size 8"):
        TrainConfig(**base, per_device_batch_size=3, packing=False).batch_plan(world_size=8)
    with pytest.raises(ConfigError, match="not a multiple"):
        TrainConfig(**base, per_device_batch_size=1, packing=False).batch_plan(world_size=24)
    assert TrainConfig(**base, per_device_batch_size=1).batch_plan(world_size=24).world_size == 24
    assert cfg.resolved_precision(cuda_available=False) == "fp32"
    assert cfg.resolved_precision(cuda_available=True) == "bf16"
    with pytest.raises(ConfigError, match="needs a GPU"):
        TrainConfig(**base, precision="bf16").resolved_precision(cuda_available=False)


def test_yaml_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_data: [x]\nmodel_path: m\noutput_uri: o\nglobal_batch_size: 0\nlearnign_rate: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_yaml_config(bad, TrainConfig)
    msg = str(exc.value)
    assert "global_batch_size" in msg and "learnign_rate" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="cannot read config"):
        load_yaml_config(tmp_path / "missing.yaml", TrainConfig)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml_config(tmp_path / "list.yaml", EvalConfig)


def test_deepspeed_config_and_launch_lines():
    cfg = TrainConfig(train_data=["x"], model_path="m", output_uri="o")
    ds = deepspeed_config(cfg)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
    assert "optimizer" not in ds  # Trainer's AdamW unless offloading
    offload = deepspeed_config(
        TrainConfig(train_data=["x"], model_path="m", output_uri="o", offload_optimizer=True)
    )
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["optimizer"]["type"] == "AdamW"
    assert launch_command("c.yaml", num_gpus=8) == [
        "deepspeed", "--num_gpus", "8", "--module", "training.sft", "--config", "c.yaml"
    ]  # fmt: skip
    tr = launch_command("c.yaml", num_gpus=8, num_nodes=2, launcher="torchrun", master_addr="10.0.0.1")
    assert tr[:6] == ["torchrun", "--nproc_per_node", "8", "--nnodes", "2", "--rdzv_backend"]
    assert "10.0.0.1:29500" in tr and tr[-3:] == ["training.sft", "--config", "c.yaml"]
    with pytest.raises(ConfigError, match="hostfile"):
        launch_command("c.yaml", num_gpus=8, num_nodes=2)
    grpo = launch_command("j.json", num_gpus=2, launcher="torchrun", module="training.rl")
    assert grpo == ["torchrun", "--standalone", "--nproc_per_node", "2", "--nnodes", "1", "-m", "training.rl",
                    "--config", "j.json"]  # fmt: skip


# --------------------------------------------------------------------------- encoding + collator


def test_labels_mask_everything_but_assistant_turns(tokenizer):
    messages = normalize_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "First question?"},
            {"role": "assistant", "content": "<think>one</think>First answer."},
            {"role": "user", "content": "Second question?"},
            {"role": "assistant", "content": "Second answer."},
        ],
        num_images=0,
    )
    enc = encode_conversation(tokenizer, messages, max_seq_len=512)
    assert len(enc.input_ids) == len(enc.labels) and not enc.truncated
    learned = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(enc.input_ids, enc.labels, strict=True))
    assert tokenizer.decode(learned) == "<think>one</think>First answer.<|im_end|>Second answer.<|im_end|>"
    # Nothing of the system or user turns (nor the role headers) is learned.
    masked = tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab == -100])
    assert "First question?" in masked and "Be brief." in masked and "answer" not in masked

    collator = SFTCollator(pad_token_id=tokenizer.pad_token_id, max_seq_len=512)
    short = encode_conversation(
        tokenizer,
        normalize_messages([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], 0),
    )
    batch = collator(
        [
            {"input_ids": enc.input_ids, "labels": enc.labels, "images": []},
            {"input_ids": short.input_ids, "labels": short.labels, "images": []},
        ]
    )
    n = len(short.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(enc.input_ids))
    assert batch["attention_mask"][1].sum().item() == n
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()  # padding is never learned
    assert (batch["input_ids"][1, n:] == tokenizer.pad_token_id).all()

    cut = encode_conversation(tokenizer, messages, max_seq_len=len(enc.input_ids) - 3)
    assert cut.truncated and len(cut.input_ids) == len(enc.input_ids) - 3
    with pytest.raises(RecordError, match="too_long"):
        encode_conversation(tokenizer, messages, max_seq_len=8)


def test_normalize_messages_formats_and_malformed_rows():
    # TRL parts (image parts carry text=None in the export) and LLaMA-Factory <image> markers.
    trl = normalize_messages(
        [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
        ],
        num_images=1,
    )
    assert trl[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Q"}]
    lf = normalize_messages(
        [{"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "Same."}], 2
    )
    assert lf[0]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
    plain = normalize_messages([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], 1)
    assert plain[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Q"}]
    bad = {
        "bad_role": [{"role": "doctor", "content": "x"}],
        "no_assistant_turn": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}],
        "bad_turn_order": [{"role": "assistant", "content": "A"}],
        "bad_messages": [],
    }
    for reason, messages in bad.items():
        with pytest.raises(RecordError) as exc:
            normalize_messages(messages, 0)
        assert exc.value.reason == reason
    with pytest.raises(RecordError, match="image_count_mismatch"):
        normalize_messages(
            [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}], 2
        )


def test_reasoning_span():
    assert reasoning_span("<think>a b</think>Final answer: A") == ("a b", True)
    assert reasoning_span("<think>still thinking") == ("still thinking", False)
    assert reasoning_span("Final answer: A") == ("", True)


# --------------------------------------------------------------------------- loud failures


def test_text_model_refuses_multimodal_rows_and_bad_paths(tiny_text, tmp_path):
    export = storage.Dataset(str(tmp_path / "export"), LLAMAFACTORY_SCHEMA)
    row = {
        "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
        "images": ["/nowhere/x.png"],
        "question_id": "q",
        "source": "s",
        "teacher": "t",
    }
    export.write_shard(0, [row])
    cfg = TrainConfig(train_data=[export.uri], model_path=str(tiny_text), output_uri=str(tmp_path / "ck"))
    with pytest.raises(ConfigError, match="1 of 1 training rows have images but the model .* is text-only"):
        train(cfg)
    with pytest.raises(ConfigError, match="not a local model folder"):
        train(cfg.model_copy(update={"model_path": str(tmp_path / "no-model")}))
    with pytest.raises(ConfigError, match="no Parquet files"):
        train(cfg.model_copy(update={"train_data": [str(tmp_path / "empty")]}))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from cli import main

    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read config") and "\n" not in err
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"checkpoint_uri": str(tmp_path), "questions_uri": str(tmp_path / "q")}))
    assert main(["eval", "--config", str(cfg)]) == 2
    assert "no Parquet files" in capsys.readouterr().err
    # Wrong data or model paths fail before any launcher starts: one line, no worker output.
    recipe = str(REPO / "training" / "configs" / "octomed-7b-zero2.yaml")
    out = str(tmp_path / "out")
    assert (
        main(["train", "--config", recipe, "--train-data", str(tmp_path / "none"), "--output-uri", out]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no Parquet files") and "\n" not in err
    export = storage.Dataset(str(tmp_path / "export"), LLAMAFACTORY_SCHEMA)
    export.write_shard(0, training_rows(2))
    args = ["--train-data", export.uri, "--output-uri", out, "--model", str(tmp_path / "no-model")]
    assert main(["train", "--config", recipe, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model_path") and "\n" not in err
    # The per-node launch line for a scheduler, with the resolved config written for every node.
    resolved = tmp_path / "resolved.yaml"
    launch = ["--launch-line", "8", "--nodes", "2", "--master-addr", "10.0.0.1", "--hostfile", "hosts"]
    assert main(["train", "--config", recipe, *args[:4], *launch, "--config-out", str(resolved)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("deepspeed --num_gpus 8 --num_nodes 2") and line.endswith(f"--config {resolved}")
    assert load_yaml_config(resolved, TrainConfig).train_data == [export.uri]


# --------------------------------------------------------------------------- end to end


def test_sft_zero3_on_cpu_to_s3_then_evaluate(tiny_text, tmp_path, s3_bucket, monkeypatch):
    """Tiny Qwen2, DeepSpeed ZeRO-3, checkpoint uploaded to S3; then eval reloads it and generates.
    The job JIT-builds no DeepSpeed kernel it does not use (the shared-memory inference all-reduce
    took ~50 s of CPU per venv)."""
    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    export = storage.Dataset(str(tmp_path / "export"), LLAMAFACTORY_SCHEMA)
    export.write_shard(0, training_rows(8))
    malformed = {"messages": [{"role": "user", "content": "no reply"}], "images": [], "question_id": "bad"}
    export.write_shard(1, training_rows(16)[8:] + [{**malformed, "source": "s", "teacher": "t"}])
    checkpoint = f"{s3_bucket}/runs/tiny/checkpoint"
    cfg = {
        "train_data": [export.uri],
        "model_path": str(tiny_text),
        "output_uri": checkpoint,
        "global_batch_size": 8,
        "per_device_batch_size": 4,  # -> gradient accumulation 2
        "max_steps": 80,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "max_seq_len": 256,
        "zero_stage": 3,
        "logging_steps": 10,
        "save_steps": 40,  # intermediate checkpoints (with ZeRO optimizer shards) uploaded too
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    result = run_sft(tmp_path / "train.yaml")

    assert not any(extensions.glob("*shm_comm*"))  # nothing JIT-built for the job (folder may not exist)
    assert result["steps"] == 80 and result["samples_seen"] == 80 * 8 and result["resumed_from_step"] == 0
    assert result["rows"] == 17 and result["skipped"] == {"no_assistant_turn": 1}
    losses = result["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] / 10
    marker = storage.read_json(f"{checkpoint}/checkpoint.json")
    assert marker["final"] and marker["step"] == 80 and marker["zero_stage"] == 3
    assert marker["config_hash"] == TrainConfig(**cfg).config_hash()
    assert [d["rows"] for d in marker["data_manifest"]] == [8, 9]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(marker["files"])

    step40 = storage.read_json(f"{checkpoint}/checkpoints/checkpoint-40/checkpoint.json")
    assert step40["step"] == 40 and not step40["final"] and "trainer_state.json" in step40["files"]
    assert any(f.startswith("global_step40/") for f in step40["files"])  # DeepSpeed ZeRO shards

    # A run killed after step 40 (its later checkpoints and its final marker never uploaded) resumes
    # from step 40. (With its final marker it would be a finished training: nothing to train.)
    fs, path = storage.filesystem(f"{checkpoint}/checkpoints/checkpoint-80")
    fs.rm(path, recursive=True)
    fs.rm(storage.filesystem(f"{checkpoint}/checkpoint.json")[1])
    resumed = run_sft(tmp_path / "train.yaml")
    assert resumed["resumed_from_step"] == 40 and resumed["steps"] == 80
    assert resumed["samples_seen"] == 40 * 8 and math.isfinite(resumed["final_loss"])
    assert resumed["final_loss"] < losses[0] / 10

    # Held-out style questions: two sources, gold A (what the model learned to say) and gold B.
    questions = storage.Dataset(str(tmp_path / "questions"), QUESTION_SCHEMA)
    questions.write_shard(
        0, [question(i, "A", "gold_a") for i in range(3)] + [question(i, "B", "gold_b") for i in range(3)]
    )
    ev = evaluate(
        EvalConfig(
            checkpoint_uri=checkpoint,
            questions_uri=questions.uri,
            max_new_tokens=24,
            batch_size=4,
            shard_size=4,
            seeds=1,
            temperature=0.0,  # greedy: what the model learned, without sampling noise
        ),
        progress=False,
    )
    assert isinstance(ev, EvalResult) and ev.items == 6 and ev.predictions == 6
    per = ev.per_benchmark  # a question dataset's sources are its benchmarks
    assert per["gold_a"]["accuracy_mean"] == 1.0 and per["gold_b"]["accuracy_mean"] == 0.0
    assert ev.macro_accuracy == 0.5
    mcq = ev.per_task_type["text_mcq"]
    assert mcq["predictions"] == 6 and mcq["reasoning_tokens_mean"] > 0 and mcq["forced_end"] == 0
    metrics = storage.read_json(ev.metrics_uri)
    assert ev.metrics_uri == f"{checkpoint}/eval/eval/metrics.json"
    assert metrics["checkpoint_step"] == 80 and metrics["per_benchmark"] == ev.per_benchmark
    preds = storage.Dataset(ev.predictions_uri).read_all()
    assert preds.num_rows == 6 and len(storage.Dataset(ev.predictions_uri).manifest()) == 2
    assert sum(preds.column("correct").to_pylist()) == 3
    assert set(preds.column("extracted_answer").to_pylist()) == {"A"}


def test_vl_sft_from_trl_export_streaming_then_evaluate(tiny_text, tmp_path):
    """Tiny Qwen2.5-VL trained (ZeRO-2, streaming) on the real TRL export with embedded images."""
    from octomed_data.export import export
    from octomed_data.mixture import MIXTURE_SCHEMA
    from training.tiny import build_vl_model

    model_dir = build_vl_model(tmp_path / "vl")
    images = []
    for i in range(3):
        uri = str(tmp_path / "img" / f"scan{i}.png")
        storage.write_bytes(uri, png(i, (64 + 16 * i, 72)))
        images.append({"sha256": f"{i:064d}", "uri": uri, "phash": i, "width": 64 + 16 * i, "height": 72})
    mixture = storage.Dataset(str(tmp_path / "mix" / "train"), MIXTURE_SCHEMA)
    rows = []
    for i in range(8):
        q = question(
            i, "yes", "vqa", task_type="yes_no_maybe", options=None, images=[images[i % 3]] if i % 4 else []
        )
        rows.append(
            {**q, "split": "train", "gold_answer": "yes", "sample_idx": 0, "teacher": "t", "model": "m",
             "reasoning": "Look.", "response": "Final answer: yes", "extracted_answer": "yes", "copy": 0,
             "shuffle_key": i}
        )  # fmt: skip
    mixture.write_shard(0, rows)
    trl = export(str(tmp_path / "mix"), str(tmp_path / "export"), formats=["trl"]).datasets["trl"]["train"]
    pf = pq.ParquetFile(storage.Dataset(trl).files()[0])
    assert pa.types.is_struct(pf.schema_arrow.field("images").type.value_type)  # bytes embedded

    cfg = {
        "train_data": [trl],
        "model_path": str(model_dir),
        "output_uri": str(tmp_path / "vl-ckpt"),
        "global_batch_size": 4,
        "per_device_batch_size": 2,
        "num_train_epochs": 2,
        "streaming": True,  # steps come from the Parquet footers: ceil(8 * 2 / 4) = 4
        "learning_rate": 1e-3,
        "max_seq_len": 512,
        "zero_stage": 2,
        "logging_steps": 1,
        "max_pixels": 96 * 96,
    }
    (tmp_path / "vl.yaml").write_text(yaml.safe_dump(cfg))
    result = run_sft(tmp_path / "vl.yaml")
    assert result["steps"] == 4 and result["samples_seen"] == 16 and result["skipped"] == {}
    assert all(math.isfinite(x) for x in result["losses"])
    ckpt = Path(cfg["output_uri"])
    assert (ckpt / "preprocessor_config.json").is_file() and (ckpt / "checkpoint.json").is_file()

    questions = storage.Dataset(str(tmp_path / "vq"), QUESTION_SCHEMA)
    questions.write_shard(
        0,
        [
            question(i, "yes", "vqa", task_type="yes_no_maybe", options=None, images=[images[i]])
            for i in range(3)
        ],
    )
    ev = evaluate(
        EvalConfig(
            checkpoint_uri=str(ckpt), questions_uri=questions.uri, max_new_tokens=8, batch_size=2, seeds=2
        ),
        progress=False,
    )
    assert ev.items == 3 and ev.per_task_type["yes_no_maybe"]["predictions"] == 3 * 2
    preds = storage.Dataset(ev.predictions_uri).read_all().to_pylist()
    # "forced": a random model that happens to write "<think>" and run out of budget is forced to end.
    assert all(
        p["completion_tokens"] > 0 and p["finish_reason"] in ("stop", "length", "forced") for p in preds
    )

    # The text-only tiny checkpoint must refuse image questions instead of ignoring the images.
    with pytest.raises(ConfigError, match="3 of 3 selected questions have images"):
        evaluate(EvalConfig(checkpoint_uri=str(tiny_text), questions_uri=questions.uri), progress=False)


# --------------------------------------------------------------------------- launchers, resume, Ray Train


def test_shipped_zero2_and_zero3_recipes_validate(tmp_path):
    """The paper's recipe as shipped configs: both ZeRO stages, 512 examples per step on 8 GPUs."""
    for stage in (2, 3):
        path = REPO / "training" / "configs" / f"octomed-7b-zero{stage}.yaml"
        cfg = load_yaml_config(
            path, TrainConfig, {"train_data": ["s3://b/export"], "output_uri": "s3://b/ck"}
        )
        assert cfg.zero_stage == stage and cfg.model_path == "Qwen/Qwen2.5-VL-7B-Instruct"
        assert (cfg.num_train_epochs, cfg.learning_rate, cfg.lr_scheduler_type) == (3, 5e-5, "cosine")
        assert (cfg.warmup_ratio, cfg.precision, cfg.max_pixels) == (0.1, "bf16", 262144)
        plan = cfg.batch_plan(world_size=8)
        assert plan.per_device_batch_size * plan.gradient_accumulation_steps * 8 == 512
        assert deepspeed_config(cfg)["zero_optimization"]["stage"] == stage
    # Without data/output the config is one clear line naming both.
    with pytest.raises(ConfigError, match=r"train_data: Field required; output_uri: Field required"):
        load_yaml_config(REPO / "training" / "configs" / "octomed-7b-zero3.yaml", TrainConfig)


def test_resolve_model_folder_checkpoint_uri_and_hub_id(tiny_text, tmp_path, s3_bucket, monkeypatch):
    from training.checkpoints import upload_folder
    from training.models import resolve_model

    assert resolve_model(str(tiny_text), tmp_path / "c1") == tiny_text
    assert resolve_model(f"file://{tiny_text}", tmp_path / "c1") == tiny_text
    uri = f"{s3_bucket}/models/tiny"
    files = upload_folder(tiny_text, uri)
    with pytest.raises(ConfigError, match="no checkpoint.json"):
        resolve_model(uri, tmp_path / "c2")  # an upload without its marker is unfinished
    storage.write_json(f"{uri}/checkpoint.json", {"files": files, "created_at": "t0"})
    local = resolve_model(uri, tmp_path / "c2")
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == sorted(files)
    # Not in the HF cache, hub forbidden: one line, no traceback, no network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="cannot resolve model 'Qwen/Qwen2.5-VL-7B-Instruct'") as exc:
        resolve_model("Qwen/Qwen2.5-VL-7B-Instruct", tmp_path / "c3")
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="not a local model folder"):
        resolve_model(str(tmp_path / "nowhere"), tmp_path / "c4")


def _launch_config(export_uri: str, model: Path, output_uri: str, tmp_path: Path, **kw) -> TrainConfig:
    base = {
        "train_data": [export_uri],
        "model_path": str(model),
        "output_uri": output_uri,
        "global_batch_size": 8,
        "per_device_batch_size": 2,  # x 2 processes -> gradient accumulation 2
        "max_steps": 8,
        "learning_rate": 2e-3,
        "lr_scheduler_type": "constant",  # step t's loss depends only on steps before it
        "warmup_ratio": 0.0,
        "max_seq_len": 256,
        "zero_stage": 3,
        "logging_steps": 1,
        "save_steps": 2,
        "work_dir": str(tmp_path / "work"),
    }
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def launch_export(tmp_path_factory) -> str:
    export = storage.Dataset(str(tmp_path_factory.mktemp("launch") / "export"), LLAMAFACTORY_SCHEMA)
    export.write_shard(0, training_rows(16))
    return export.uri


@pytest.fixture(scope="module")
def launch_bucket(s3_endpoint) -> str:
    """One loopback S3 bucket shared by the launcher tests of this module."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing")
    fs.mkdir("octomed-launch")
    return "s3://octomed-launch"


@pytest.fixture(scope="module")
def reference_run(launch_export, tiny_text, tmp_path_factory, launch_bucket) -> dict:
    """An uninterrupted 2-process ZeRO-3 run (torchrun, gloo) checkpointing to S3 every 2 steps."""
    from training.launch import launch_training

    s3_bucket = launch_bucket
    tmp = tmp_path_factory.mktemp("reference")
    config = _launch_config(launch_export, tiny_text, f"{s3_bucket}/launch/reference", tmp)
    lines: list[str] = []
    result = launch_training(
        config, work_dir=tmp / "job", launcher="torchrun", processes=2, on_line=lines.append
    )
    return {"config": config, "result": result, "lines": lines}


def test_torchrun_two_processes_zero3_checkpoints_on_s3(reference_run):
    result, config = reference_run["result"], reference_run["config"]
    assert result["steps"] == 8 and result["samples_seen"] == 8 * 8 and len(result["losses"]) == 8
    assert all(math.isfinite(x) for x in result["losses"]) and result["losses"][-1] < result["losses"][0]
    # Both ranks really ran: each rank's ZeRO-3 optimizer shard is uploaded with every checkpoint.
    for step in (2, 4, 6, 8):
        marker = storage.read_json(f"{config.output_uri}/checkpoints/checkpoint-{step}/checkpoint.json")
        shards = [f for f in marker["files"] if f.startswith(f"global_step{step}/") and "optim_states" in f]
        assert len(shards) == 2 and marker["world_size"] == 2 and marker["step"] == step
    final = storage.read_json(f"{config.output_uri}/checkpoint.json")
    assert final["final"] and final["zero_stage"] == 3 and "model.safetensors" in final["files"]


def test_killed_job_resumes_from_s3_with_identical_losses(reference_run, launch_export, tiny_text, tmp_path):
    """SIGKILL the whole job after a checkpoint reached S3; the re-run resumes and matches the reference."""
    import signal

    from training.launch import launch_training, start_job

    ref = reference_run["config"]
    config = _launch_config(launch_export, tiny_text, ref.output_uri.replace("reference", "killed"), tmp_path)
    assert config.config_hash() == ref.config_hash()  # same job, another place
    proc, _ = start_job(config, tmp_path / "job1", launcher="torchrun", processes=2)
    logged_steps = 0
    for line in proc.stdout:  # rank 0 logs each step's loss; step 3's comes after checkpoint-2 is on S3
        logged_steps += "'loss':" in line
        if logged_steps == 3:
            os.killpg(proc.pid, signal.SIGKILL)  # launcher and both workers, mid-run
            break
    proc.wait()
    proc.stdout.close()
    assert logged_steps == 3
    assert storage.exists(f"{config.output_uri}/checkpoints/checkpoint-2/checkpoint.json")
    assert not storage.exists(f"{config.output_uri}/checkpoint.json")

    # The re-run starts from a fresh local work folder: what it resumes from comes from S3.
    resumed = launch_training(
        config.model_copy(update={"work_dir": str(tmp_path / "work2")}),
        work_dir=tmp_path / "job2",
        launcher="torchrun",
        processes=2,
    )
    k = resumed["resumed_from_step"]
    assert k in (2, 4) and resumed["steps"] == 8 and resumed["samples_seen"] == (8 - k) * 8
    # Same data order and state: every step after the resume has the reference's loss.
    np.testing.assert_allclose(resumed["losses"], reference_run["result"]["losses"], rtol=1e-5)


def test_ray_train_two_workers_matches_torchrun(reference_run, ray_local, launch_export, tiny_text, tmp_path):
    """Ray Train (2 CPU workers, gloo) runs the same SFT: the same losses as torchrun, step for step."""
    # reference_run before ray_local: the S3 credentials are in the environment before a local Ray
    # (whose workers inherit it) starts, also when this test runs alone.
    from tasks.ray_train import train_on_ray

    ref = reference_run["config"]
    config = _launch_config(
        launch_export,
        tiny_text,
        ref.output_uri.replace("reference", "ray"),
        tmp_path,
        max_steps=4,
        save_steps=None,
    )
    result = train_on_ray(config, num_workers=2, cpus_per_worker=0.5, storage_path=str(tmp_path / "ray"))
    assert result["steps"] == 4 and result["samples_seen"] == 4 * 8
    np.testing.assert_allclose(result["losses"], reference_run["result"]["losses"][:4], rtol=1e-5)
    assert storage.read_json(f"{config.output_uri}/checkpoint.json")["world_size"] == 2


def test_failed_job_is_one_line(launch_export, tiny_text, tmp_path):
    from training.launch import TrainingFailed, launch_training

    config = _launch_config(launch_export, tiny_text, str(tmp_path / "out"), tmp_path, max_seq_len=16)
    # max_seq_len 16 leaves no learnable token in any row: the worker fails, the caller gets its reason.
    with pytest.raises(TrainingFailed, match=r"exited with code \d+: no usable training rows") as exc:
        launch_training(config, work_dir=tmp_path / "job", launcher="torchrun", processes=1)
    assert "\n" not in str(exc.value)
    bad = config.model_copy(update={"model_path": str(tmp_path)})  # no config.json: refused before launch
    with pytest.raises(ConfigError, match=r"model_path .* is not a local model"):
        launch_training(bad, work_dir=tmp_path / "job", launcher="torchrun", processes=1)
    unpacked = config.model_copy(update={"packing": False})  # packed plans round; padded ones must divide
    with pytest.raises(ConfigError, match="not a multiple"):
        launch_training(unpacked, work_dir=tmp_path / "job", launcher="torchrun", processes=3)


def test_stale_local_checkpoints_never_rotate_away_fresh_saves(launch_export, tiny_text, tmp_path):
    """A killed earlier job's higher-numbered local checkpoints must not make Trainer delete new ones."""
    config = _launch_config(
        launch_export,
        tiny_text,
        str(tmp_path / "out"),
        tmp_path,
        max_steps=4,
        zero_stage=0,
        save_total_limit=1,
    )
    import time

    for step in (500, 750):  # what a crashed longer job left behind in the same work folder
        stale = tmp_path / "work" / "trainer" / f"checkpoint-{step}"
        stale.mkdir(parents=True)
        (stale / "trainer_state.json").write_text("{}")
        # Clock skew on shared storage (or a fuse mount's fake mtimes): they look newer than new saves,
        # so Trainer's rotation would keep them and delete the fresh checkpoint before its upload.
        later = time.time() + 3600
        os.utime(stale, (later, later))
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = run_sft(config_path)
    assert result["steps"] == 4
    for step in (2, 4):
        marker = storage.read_json(
            str(tmp_path / "out" / "checkpoints" / f"checkpoint-{step}" / "checkpoint.json")
        )
        assert "model.safetensors" in marker["files"] and "trainer_state.json" in marker["files"]
    assert not (tmp_path / "work" / "trainer" / "checkpoint-750").exists()


def test_attention_implementation_is_a_setting(tiny_text):
    from training.models import load_model_and_processors

    model, _, _ = load_model_and_processors(tiny_text, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    if importlib.util.find_spec("flash_attn") is None:  # CPU machines: one clear line, nothing loaded
        with pytest.raises(ConfigError, match="needs flash-attn on a GPU"):
            load_model_and_processors(tiny_text, attn_implementation="flash_attention_2")
    assert TrainConfig(train_data="x", model_path="m", output_uri="o").attn_implementation == "auto"
