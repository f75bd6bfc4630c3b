"""Helpers the SFT and packing tests share: a fresh ``python -m training.sft`` process, question
rows, training conversations prompted as evaluation prompts, and random PNG images."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.harness import chat_messages
from octomed_data.schema import question_row

REPO = Path(__file__).resolve().parents[2]
ANSWER_A = "<think>\nAspirin.\n</think>\n\nFinal answer: \\boxed{A}"


def run_sft(config_path: Path, timeout: int = 240) -> dict:
    """``python -m training.sft --config ...`` in a fresh process; returns its TrainResult JSON."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "training.sft", "--config", str(config_path), "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def question(i: int, answer: str, source: str, **kw) -> dict:
    return question_row(
        source=source,
        split="test",
        task_type=kw.pop("task_type", "text_mcq"),
        question=f"Which drug for case {i}?",
        options=kw.pop("options", {"A": "aspirin", "B": "heparin"}),
        answer=answer,
        input_file="questions.jsonl",
        record_index=i,
        **kw,
    )


def png(seed: int, size: tuple[int, int]) -> bytes:
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def training_rows(n: int) -> list[dict]:
    """Conversations prompted exactly as evaluation prompts, always answering A."""
    rows = []
    for i in range(n):
        messages = chat_messages(question(i, "A", "train")) + [{"role": "assistant", "content": ANSWER_A}]
        rows.append(
            {"messages": messages, "images": [], "question_id": f"q{i}", "source": "s", "teacher": "t"}
        )
    return rows


def weights_hash(checkpoint_uri: str) -> str:
    """The SHA-256 of a checkpoint folder's ``model.safetensors`` (local or ``s3://``)."""
    import hashlib

    from octomed_data import storage

    return hashlib.sha256(storage.read_bytes(f"{checkpoint_uri.rstrip('/')}/model.safetensors")).hexdigest()


def small_job(export_uri: str, model: Path, output_uri: str, work: Path, **kw):
    """A 1-process TrainConfig of a few steps on the tiny model (ZeRO-2, checkpoint every 2 steps)."""
    from octomed_data.job_config import TrainConfig

    base = {
        "train_data": [export_uri],
        "model_path": str(model),
        "output_uri": output_uri,
        "global_batch_size": 4,
        "per_device_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 2e-3,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "max_seq_len": 256,
        "zero_stage": 2,
        "logging_steps": 1,
        "save_steps": 2,
        "work_dir": str(work),
    }
    return TrainConfig(**(base | kw))
