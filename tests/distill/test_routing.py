"""Routing goes by whether a question has an image, whatever its task type.

Real data: the bundled VQA-RAD sample (``octomed_data/sample_data/vqa_rad``, Lau et al. 2018; the
OSF release is commonly reported as CC0 1.0, images from MedPix: see ``sample_data/LICENSES.md``):
closed yes/no questions and open questions, every one with its radiology image.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from octomed_data import storage
from octomed_data.distill import distill_shard
from octomed_data.errors import ConfigError
from octomed_data.recipe import load_recipe
from octomed_data.sandbox import start_sandbox
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA, question_row
from octomed_data.stages.ingest import ingest
from octomed_data.teachers import DistillConfig

SAMPLE = Path(__file__).resolve().parents[2] / "octomed_data" / "sample_data" / "vqa_rad"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


def _teacher(name: str, url: str = "http://x/v1", **over) -> dict:
    return {"name": name, "base_url": url, "model": f"model-{name}", "supports_n": False} | over


def text_questions(n: int) -> list[dict]:
    return [
        question_row(
            source="medqa",
            split="train",
            task_type="text_mcq",
            question=f"Case {i}: a 5{i}-year-old with new type 2 diabetes. First-line drug?",
            answer="A",
            input_file="synthetic",
            record_index=i,
            options={"A": "Metformin", "B": "Insulin glargine"},
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def vqa_rad(tmp_path_factory) -> list[dict]:
    """VQA-RAD questions with images: 4 closed (yes/no) and 4 open, as ingest makes them."""
    out = str(tmp_path_factory.mktemp("vqa"))
    ingest(
        "vqa_rad",
        str(SAMPLE / "VQA_RAD_Dataset_Public.train_sample.json"),
        out,
        images=str(SAMPLE / "images"),
    )
    rows = storage.Dataset(storage.join(out, "questions")).read_all().to_pylist()
    closed = [r for r in rows if r["task_type"] == "yes_no_maybe"][:4]
    open_ = [r for r in rows if r["task_type"] == "open_vqa"][:4]
    assert len(closed) == 4 and len(open_) == 4 and all(r["images"] for r in closed + open_)
    return closed + open_


def test_image_questions_go_to_the_multimodal_teacher_whatever_their_task_type(
    tmp_path: Path, vqa_rad: list[dict]
) -> None:
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    text = text_questions(5)  # text MCQs (no image)
    storage.Dataset(q_uri, QUESTION_SCHEMA).write_shard("00000", text + vqa_rad)
    with start_sandbox() as a, start_sandbox() as b:
        cfg = DistillConfig.parse(
            {
                "teachers": [
                    _teacher("r1", a.base_url, modalities=["text"]),
                    _teacher("gpt4o", b.base_url, modalities=["text", "image"]),
                ],
                "routing": {"text": "r1", "multimodal": "gpt4o"},
                "samples": 2,
                "flush_interval_s": 0.05,
            }
        )
        report = distill_shard(q_uri, "00000", out, cfg)
        sent_a, sent_b = a.stats()["requests"], b.stats()["requests"]
    assert report.complete
    # Every request of an image question (closed and open) reached B; none reached A.
    assert sent_a == len(text) * 2 and sent_b == len(vqa_rad) * 2
    rows = storage.Dataset(storage.join(out, "raw"), SAMPLE_SCHEMA).read_all().to_pylist()
    model = {q["question_id"]: "model-gpt4o" for q in vqa_rad} | {q["question_id"]: "model-r1" for q in text}
    assert Counter(r["model"] == model[r["question_id"]] for r in rows) == {
        True: 2 * (len(text) + len(vqa_rad))
    }
    assert {r["task_type"] for r in rows if r["model"] == "model-gpt4o"} == {"yes_no_maybe", "open_vqa"}


def test_a_task_type_route_to_a_text_teacher_keeps_its_image_questions_off_it() -> None:
    cfg = DistillConfig.parse(
        {
            "teachers": [
                _teacher("r1", modalities=["text"]),
                _teacher("gpt4o", modalities=["text", "image"]),
            ],
            "routing": {"yes_no_maybe": "r1", "multimodal": "gpt4o"},
        }
    )
    assert cfg.teacher_for("yes_no_maybe", has_image=False).name == "r1"  # PubMedQA
    assert cfg.teacher_for("yes_no_maybe", has_image=True).name == "gpt4o"  # VQA-RAD closed
    assert cfg.teacher_for("open_vqa", has_image=True).name == "gpt4o"
    # The legacy call (no image flag) keeps its meaning: image task types are multimodal.
    assert cfg.teacher_for("mm_mcq").name == "gpt4o"


def test_images_routed_to_a_text_only_teacher_are_a_config_error(tmp_path: Path, vqa_rad: list[dict]) -> None:
    text_only = _teacher("r1", modalities=["text"])
    with pytest.raises(ConfigError, match="'r1'.*text only"):
        DistillConfig.parse({"teachers": [text_only], "routing": {"multimodal": "r1"}})
    with pytest.raises(ConfigError, match="'r1'.*text only"):
        DistillConfig.parse({"teachers": [text_only], "routing": {"open_vqa": "r1"}})
    with pytest.raises(ConfigError, match="routing 'multimodal' sends images to teacher 'r1'"):
        load_recipe(
            "demo", {"teachers": [{"name": "r1", "modalities": ["text"]}], "routing": {"multimodal": "r1"}}
        )
    # The only teacher, text-only, and a shard with image questions: ConfigError before any request.
    q_uri, out = str(tmp_path / "q"), str(tmp_path / "out")
    storage.Dataset(q_uri, QUESTION_SCHEMA).write_shard("00000", vqa_rad[:2])
    with start_sandbox() as sb:
        cfg = DistillConfig.parse(
            {"teachers": [_teacher("r1", sb.base_url, modalities=["text"])], "samples": 1}
        )
        with pytest.raises(ConfigError, match="teacher 'r1', which reads text only"):
            distill_shard(q_uri, "00000", out, cfg)
        # Modalities not declared and no explicit image route: never silently sent images.
        cfg = DistillConfig.parse({"teachers": [_teacher("t", sb.base_url)], "samples": 1})
        with pytest.raises(ConfigError, match="teacher 't', whose modalities are not declared"):
            distill_shard(q_uri, "00000", out, cfg)
        assert sb.stats()["requests"] == 0
    # An explicit multimodal route is the declaration for an undeclared teacher.
    cfg = DistillConfig.parse({"teachers": [_teacher("t")], "routing": {"multimodal": "t"}})
    assert cfg.teacher_for("yes_no_maybe", has_image=True).name == "t"


def test_the_sandbox_teacher_of_a_recipe_takes_images() -> None:
    cfg = load_recipe("demo").distill_config(sandbox_url="http://127.0.0.1:1/v1")
    assert cfg.teacher("sandbox").takes_images is True
    assert cfg.teacher_for("yes_no_maybe", has_image=True).name == "sandbox"
