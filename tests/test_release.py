"""Release: a real run (bundled sources + a PMC-VQA CSV over real DICOM files whose extra columns
carry the DICOM headers' patient fields, decontaminated against the bundled registry, distilled by
the sandbox teacher on loopback with a canary API key, filtered) published to the loopback S3
server and read back with ``datasets.load_dataset``."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from octomed_data import storage
from octomed_data.cli import main
from octomed_data.decontam.index import DecontamIndex
from octomed_data.errors import ConfigError
from octomed_data.layout import RunPaths
from octomed_data.recipe import load_recipe
from octomed_data.release import load_release, release
from octomed_data.release_safety import is_patient_key
from octomed_data.runs import start_run
from octomed_data.sandbox import FaultConfig, start_sandbox
from octomed_data.schema import QUESTION_SCHEMA, SAMPLE_SCHEMA, VERDICT_SCHEMA
from octomed_data.stages import LocalExecutor, raise_for_failures, run_stage
from octomed_data.stages.decontaminate import DecontaminateStage
from octomed_data.stages.distill import DistillStage
from octomed_data.stages.filter import FilterStage, recipe_judge
from octomed_data.stages.ingest import IngestStage

CANARY = "sk-canary-release-7d3f0a9c41e2b658"
SAMPLES = 4
DICOM_FIELDS = ("PatientName", "PatientID", "InstitutionName", "StudyInstanceUID")
TAG_KEY = "(0010,0010)"


def pmc_csv_over_dicom(shared_data: Path, folder: Path) -> tuple[Path, list[str]]:
    """A PMC-VQA CSV over two real DICOM files, its extra columns copied from their headers."""
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    rows, leaked = [], []
    for name, modality in (("CT_small.dcm", "CT"), ("MR_small.dcm", "MR")):
        shutil.copy(shared_data / "dicom" / "pydicom" / name, folder / name)
        header = pydicom.dcmread(folder / name)
        fields = {k: str(header.get(k)) for k in DICOM_FIELDS}
        leaked += [v for v in fields.values() if len(v) >= 4]
        for q, text in enumerate(
            ("Which modality acquired this scan?", "What kind of scanner made this image?")
        ):
            rows.append(
                {
                    "Figure_path": name,
                    "Question": text,
                    "Answer": modality,
                    "Choice A": "A:CT",
                    "Choice B": "B:MR",
                    "Choice C": "C:Ultrasound",
                    "Choice D": "D:PET",
                    "Answer_label": "A" if modality == "CT" else "B",
                    **fields,
                    TAG_KEY: fields["PatientName"],
                    "index": str(q),
                }  # fmt: skip
            )
    path = folder / "train.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, leaked


def build_run(
    store: Path,
    entries: list[dict],
    *,
    decontam: bool,
    demo_sources: bool = True,
    verify: dict | None = None,
    faults: dict | None = None,
) -> RunPaths:
    """ingest -> decontaminate -> distill (sandbox) -> filter (the sandbox judges too when the
    verify settings name a judge), with the library's stages."""
    overrides = {
        "store": str(store),
        "distill": {"samples": SAMPLES},
        "decontam": {"enabled": decontam},
        "sources": entries,
    }
    if verify is not None:
        overrides["verify"] = verify
    if not demo_sources:
        overrides["sources_file"] = None
    recipe = load_recipe("demo", overrides=overrides)
    paths = start_run(recipe, "rel")
    for stage in (
        IngestStage.for_run(paths, recipe.ingest_entries(), recipe.shard_size),
        DecontaminateStage.for_run(paths, recipe.decontam),
    ):
        raise_for_failures(run_stage(stage, LocalExecutor()))
    with start_sandbox(faults=FaultConfig(**(faults or {}))) as sb:
        raise_for_failures(run_stage(DistillStage(paths, recipe.distill_config(sandbox_url=sb.base_url))))
        judge = recipe_judge(recipe, sandbox_url=sb.base_url)
        raise_for_failures(run_stage(FilterStage.for_recipe(paths, recipe, judge)))
    return paths


@pytest.fixture(scope="module")
def canary_key():
    saved = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = CANARY  # the key the teacher requests carry
    yield CANARY
    if saved is None:
        os.environ.pop("OPENAI_API_KEY", None)
    else:
        os.environ["OPENAI_API_KEY"] = saved


@pytest.fixture(scope="module")
def run(shared_data, canary_key, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release-run")
    csv_path, leaked = pmc_csv_over_dicom(shared_data, tmp / "pmc")
    entry = {"format": "pmc_vqa", "input": str(csv_path), "images": str(csv_path.parent)}
    return build_run(tmp / "store", [entry], decontam=True), leaked


def released_text(uri: str) -> str:
    """Every released file: its bytes, and for Parquet its decoded rows."""
    fs, root = storage.filesystem(uri)
    parts = []
    for path in fs.find(root):
        data = fs.cat_file(path)
        parts.append(data.decode("utf-8", "replace"))
        if path.endswith(".parquet"):
            parts.append(json.dumps(pq.read_table(io.BytesIO(data)).to_pylist(), default=str))
    return "\n".join(parts)


def card_of(uri: str) -> tuple[dict, str]:
    text = storage.read_bytes(storage.join(uri, "README.md")).decode()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def by_key(rows) -> dict[tuple[str, int], dict]:
    return {(r["question_id"], r["sample_idx"]): r for r in rows}


def test_release_to_s3_loads_back_with_the_accepted_responses(run, s3_bucket):
    import datasets

    paths, _ = run
    out = f"{s3_bucket}/releases/demo"
    assert main(["release", paths.run_id, "--store", paths.store, "--out", out]) == 0
    meta, _ = card_of(out)
    (config,) = meta["configs"]
    (files,) = config["data_files"]
    ds = datasets.load_dataset(
        "parquet",
        data_files={files["split"]: storage.join(out, files["path"])},  # the card's own configuration
        split="train",
        storage_options=storage.storage_options(out),
    )
    questions = storage.Dataset(paths.questions, QUESTION_SCHEMA).read_all().to_pylist()
    assert len(ds) == len(questions) == meta["dataset_info"]["splits"][0]["num_examples"]
    assert sorted(ds["question_id"]) == sorted(q["question_id"] for q in questions)  # one row each

    accepted = by_key(storage.Dataset(paths.accepted, SAMPLE_SCHEMA).read_all().to_pylist())
    released = {}
    for row in ds:
        assert row["num_accepted"] == len(row["responses"])
        for r in row["responses"]:
            released[(row["question_id"], r["sample_idx"])] = r
            assert (r["temperature"], r["top_p"], r["max_tokens"]) == (0.6, 0.95, 8192)
    assert released.keys() == accepted.keys() and accepted
    for key, r in released.items():
        want = accepted[key]
        fields = ("teacher", "model", "prompt_version", "reasoning", "response", "extracted_answer")
        assert {f: r[f] for f in fields} == {f: want[f] for f in fields}
        assert r["correct"] is True and r["reject_reason"] is None
    images = [im for row in ds for im in row["images"]]
    assert images and all(im["path"] == f"images/{im['sha256'][:2]}/{im['sha256']}.png" for im in images)
    assert load_release(out).num_rows == len(ds)


def test_all_responses_adds_the_rejected_ones_with_their_verdicts(run, tmp_path):
    paths, _ = run
    out = str(tmp_path / "all")
    result = release(paths, out, all_responses=True)
    rows = load_release(out)
    verdicts = by_key(
        v
        for v in storage.Dataset(paths.verdicts, VERDICT_SCHEMA).read_all().to_pylist()
        if v["reject_reason"] != "request_failed"
    )
    released = {(row["question_id"], r["sample_idx"]): r for row in rows for r in row["responses"]}
    assert released.keys() == verdicts.keys() and result.responses == len(verdicts)
    for key, r in released.items():
        v = verdicts[key]
        assert (r["correct"], r["reject_reason"], r["extracted_answer"]) == (
            v["correct"], v["reject_reason"], v["extracted_answer"],
        )  # fmt: skip
    rejected = [r for r in released.values() if not r["correct"]]
    assert rejected and all(r["reject_reason"] for r in rejected)
    assert sum(r["num_samples"] for r in rows) == len(verdicts)


def test_card_numbers_are_the_run_statistics(run, tmp_path):
    paths, _ = run
    out = str(tmp_path / "card")
    result = release(paths, out)
    stats = storage.read_json(paths.stats)
    meta, body = card_of(out)
    assert meta["license"] == "other" and meta["size_categories"] == ["n<1K"]
    assert "medical" in meta["tags"] and "visual-question-answering" in meta["task_categories"]
    lines = body.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("| source | format | licence")))
    header = [c.strip() for c in lines[head].strip("|").split("|")]
    table = {}
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        table[cells["source"]] = cells
    assert set(table) == set(stats["sources"]) and {"pathvqa", "pmc_vqa", "imaging"} <= set(table)
    for source, st in stats["sources"].items():
        cells = table[source]
        assert int(cells["questions"]) == st["questions"]
        assert int(cells["samples"]) == st["samples"] and int(cells["accepted"]) == st["accepted"]
        assert cells["pass rate"] == f"{100 * st['pass_rate']:.1f}%"
        assert cells[f"pass@{SAMPLES}"] == f"{100 * st[f'pass@{SAMPLES}']:.1f}%"
        assert int(cells["without accepted"]) == st["questions_without_accepted"]
        assert int(cells["released rows"]) == result.per_source[source]["rows"]
    assert table["pathvqa"]["licence"] == "mit" and table["imaging"]["licence"] == "unknown"
    assert f"| samples judged in the run | {stats['overall']['samples']} |" in body
    assert f"| accepted samples in the run | {stats['overall']['accepted']} |" in body
    removed = Counter(storage.Dataset(paths.removed).read_all().column("match_benchmark").to_pylist())
    assert removed and all(f"| {b} | " in body for b in removed)
    assert "SHA-256 `" in body and "16-gram" in body and "NOT model traces" in body  # sandbox teacher


def test_no_api_key_and_no_patient_metadata_anywhere(run, tmp_path):
    paths, leaked = run
    questions = storage.Dataset(paths.questions, QUESTION_SCHEMA).read_all().to_pylist()
    ingested = json.dumps([q["metadata"] for q in questions])
    assert all(v in ingested for v in leaked)  # the run itself carries the DICOM header fields
    out = str(tmp_path / "scan")
    result = release(paths, out, all_responses=True)
    text = released_text(out)
    assert CANARY not in text
    for value in leaked:
        assert value not in text, value
    assert result.metadata_keys_dropped == {k: 4 for k in (*DICOM_FIELDS, TAG_KEY)}
    for row in load_release(out):
        for key in json.loads(row["metadata"] or "{}"):
            assert not is_patient_key(key)


def test_a_key_inside_a_reply_stops_the_release(run, tmp_path, monkeypatch):
    """A teacher echoing its key: the shard is not committed and no card is written."""
    paths, _ = run
    reply = next(r for r in storage.Dataset(paths.accepted).read_all().to_pylist() if r["reasoning"])
    secret = reply["reasoning"][:24]
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    out = tmp_path / "leak"
    with pytest.raises(ConfigError) as err:
        release(paths, str(out))
    assert "$OPENAI_API_KEY" in str(err.value) and secret not in str(err.value)
    assert not (out / "README.md").exists()


def test_released_questions_are_no_benchmark_items(run, canary_key, tmp_path):
    """The release-time check: a run distilled WITHOUT decontamination (the bundled sources hold
    MedQA, MedMCQA, MMLU and OmniMedVQA test items, and VQA-RAD test images) releases no registry
    item: it leaves out exactly what the decontaminate stage removed from the same sources."""
    dirty = build_run(tmp_path / "store", [], decontam=False)
    index = DecontamIndex.from_registry()
    for paths, out in ((run[0], tmp_path / "clean"), (dirty, tmp_path / "dirty")):
        result = release(paths, str(out))
        rows = list(load_release(str(out)))
        table = storage.Dataset(paths.questions, QUESTION_SCHEMA).read_all()
        kept = {r["question_id"] for r in rows}
        released = table.filter(pa.array([q in kept for q in table.column("question_id").to_pylist()]))
        assert released.num_rows == len(rows) > 0
        assert all(m is None for m in index.check_table(released))  # checked against the registry
    removed = storage.Dataset(run[0].removed).read_all().to_pylist()
    assert {e["question_id"] for e in result.excluded} == {r["question_id"] for r in removed}
    assert Counter(e["benchmark"] for e in result.excluded) == Counter(r["match_benchmark"] for r in removed)
    assert {"medqa", "medmcqa", "mmlu_medical", "omnimedvqa", "vqa_rad"} <= {
        e["benchmark"] for e in result.excluded
    }
    assert storage.read_json(str(tmp_path / "dirty" / "release.json"))["excluded"] == result.excluded
    _, body = card_of(str(tmp_path / "dirty"))
    assert f"excluded {len(removed)}." in body and "stage was OFF" in body


def test_large_shards_are_grouped_in_buckets_with_the_same_result(run, tmp_path, monkeypatch):
    import octomed_data.release as rel

    paths, _ = run
    release(paths, str(tmp_path / "one"), all_responses=True)
    monkeypatch.setattr(rel, "BUCKET_BYTES", 1024)  # every reply shard spills into several buckets
    release(paths, str(tmp_path / "many"), all_responses=True)
    one = {r["question_id"]: r for r in load_release(str(tmp_path / "one"))}
    many = {r["question_id"]: r for r in load_release(str(tmp_path / "many"))}
    assert one == many and len(one) > 0


def test_unfiltered_run_and_bad_recipe_block_are_one_line_errors(run, tmp_path, capsys):
    paths, _ = run
    copy = tmp_path / "store"
    shutil.copytree(Path(paths.root).parent.parent, copy)
    copied = RunPaths(str(copy), paths.run_id)
    shard = next(iter(storage.Dataset(copied.verdicts).manifest()))
    os.remove(storage.Dataset(copied.verdicts).marker_uri(shard))
    assert main(["release", paths.run_id, "--store", str(copy), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"error: run {paths.run_id} is not filtered .*{shard}", err[0])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match=r"release\.out is required"):
        load_recipe("demo", overrides={"release": {"enabled": True}})
    assert load_recipe("demo", overrides={"release": {"enabled": True, "out": "s3://b/r"}}).release.out


def test_a_run_filtered_with_its_own_verifier_settings_is_released(canary_key, tmp_path):
    """Review finding: release checked the verdicts against the default verifier settings, so a run
    filtered with a ``verify:`` block could never be released ("not filtered")."""
    paths = build_run(
        tmp_path / "store",
        [],
        decontam=False,
        verify={"sources": {"pathvqa": "normalized"}, "synonyms": [["carcinoma", "cancer"]]},
    )
    result = release(paths, str(tmp_path / "out"))
    assert result.rows > 0


def test_a_judge_verified_release_carries_the_verifier_and_the_calibration(canary_key, tmp_path):
    """Issue 21: a release of a judge-verified run lost ``verifier``, ``verifier_rule`` and
    ``judge_correct``, and its card showed no calibration, so judge-accepted answers looked like
    exact matches. The sandbox judge errs on 30% of its keys here, so it accepts some wrong answers."""
    verify = {"sources": {"pathvqa": "judge", "vqa_rad": "judge"}, "calibration_samples": 20}
    paths = build_run(
        tmp_path / "store", [], decontam=False, verify=verify, faults={"judge_error": 0.3, "seed": 4}
    )
    out = str(tmp_path / "out")
    result = release(paths, out, all_responses=True)
    verdicts = by_key(storage.Dataset(paths.verdicts, VERDICT_SCHEMA).read_all().to_pylist())
    rows = list(load_release(out))
    released = {(row["question_id"], r["sample_idx"]): r for row in rows for r in row["responses"]}
    assert released and result.responses == len(released)
    fields = ("correct", "verifier", "verifier_rule", "judge_correct")
    for key, r in released.items():
        assert {f: r[f] for f in fields} == {f: verdicts[key][f] for f in fields}
        if r["correct"]:
            assert r["verifier"] in ("exact", "normalized", "judge") and r["verifier_rule"]
    by_judge = [r for r in released.values() if r["correct"] and r["verifier"] == "judge"]
    assert by_judge and all(r["judge_correct"] is True and r["verifier_rule"] == "judge" for r in by_judge)
    calibrated = [r for r in released.values() if r["verifier"] == "exact" and r["judge_correct"] is not None]
    assert calibrated  # closed replies the judge was asked about, their verdict still exact match's
    # The accepted-only release carries them too (from the accepted rows' verdicts).
    accepted_only = str(tmp_path / "accepted")
    release(paths, accepted_only)
    for row in load_release(accepted_only):
        for r in row["responses"]:
            key = (row["question_id"], r["sample_idx"])
            assert {f: r[f] for f in fields} == {f: verdicts[key][f] for f in fields}
    # release.json and the card: the settings and the judge's calibration per source, false-accept
    # rate included (fp / (fp + tn): of the wrong closed replies, the share the judge accepted).
    stats = storage.read_json(paths.stats)
    calibration = stats["verifier"]["calibration"]
    summary = storage.read_json(str(tmp_path / "out" / "release.json"))
    assert summary["verifier"]["calibration"] == calibration
    assert summary["verifier"]["settings"]["sources"]["pathvqa"]["mode"] == "judge"
    for source, c in calibration.items():
        wrong = c["fp"] + c["tn"]
        assert c["false_accept_rate"] == (round(c["fp"] / wrong, 4) if wrong else None), source
    assert calibration["overall"]["fp"] > 0  # the judge did accept wrong answers
    _, body = card_of(out)
    lines = body.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("| source | judged | precision")))
    header = [c.strip() for c in lines[head].strip("|").split("|")]
    assert "false-accept rate" in header
    table = {}
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        table[cells["source"]] = cells
    assert set(table) == set(calibration) and "overall" in table
    for source, c in calibration.items():
        far = c["false_accept_rate"]
        assert table[source]["false-accept rate"] == ("–" if far is None else f"{100 * far:.1f}%")
        assert int(table[source]["judged"]) == c["judged"] and int(table[source]["fp"]) == c["fp"]
    assert "## Verification" in body and "sandbox-not-a-model" in body
    by_source = Counter(
        row["source"] for row in rows for r in row["responses"] if r["correct"] and r["verifier"] == "judge"
    )
    for source, n in by_source.items():
        assert result.per_source[source]["accepted_by_judge"] == n
    assert f"{len(by_judge)} accepted response(s) were accepted by the LLM judge" in body
