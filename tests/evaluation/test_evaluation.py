"""The evaluation harness on the real benchmark files: sandbox endpoint on loopback, tiny HF models.

Metrics are checked against the predictions read back from Parquet (mean ± std over seeds recomputed
by hand), forced ends against the continuation the sandbox wrote, and every error path is one line.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from evaluation.backends import FORCE_CUE, Generation, SamplingProtocol, still_thinking
from evaluation.benchmarks import BENCHMARKS, get_benchmarks, iter_benchmark, resolve_data_dir
from evaluation.harness import evaluate, score_generation
from evaluation.report import MetricsAccumulator
from octomed_data import storage
from octomed_data.answers import extract_answer, is_correct, token_f1
from octomed_data.errors import ConfigError
from octomed_data.job_config import EvalConfig
from octomed_data.prompts import system_prompt
from octomed_data.sandbox import FaultConfig, start_sandbox
from octomed_data.schema import options_of


def _by_benchmark_seed(rows: list[dict]) -> dict[str, dict[int, list[dict]]]:
    out: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[r["benchmark"]][r["seed"]].append(r)
    return out


# --------------------------------------------------------------------------- units


def test_token_f1_cases():
    assert token_f1("left lower lobe", "Left lower lobe.") == 1.0
    assert token_f1("lower lobe", "left lower lobe") == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert token_f1("the right kidney", "kidney") == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # article dropped
    assert token_f1("liver", "spleen") == 0.0
    assert token_f1(None, "spleen") == 0.0  # unparseable earns nothing
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)  # multiset overlap, not set overlap


def test_unparseable_is_wrong_and_counted_not_guessed():
    row = next(iter_benchmark(BENCHMARKS["medqa"], resolve_data_dir(), _no_store(), _stats(), limit=1))
    gen = Generation("I am not sure; it could be several things.", 12, 0, "stop")
    p = score_generation(row, gen, benchmark="medqa", seed=0, version="v")
    assert p["extracted_answer"] is None and p["no_answer_reason"] == "no_answer" and p["correct"] is False
    ok = score_generation(
        row, Generation(f"<think>x</think>\n\nFinal answer: \\boxed{{{row['answer']}}}", 5, 1, "stop"),
        benchmark="medqa", seed=0, version="v",
    )  # fmt: skip
    assert ok["correct"] and ok["extract_method"] == "boxed" and ok["think_closed"]
    assert (
        still_thinking("<think>step 1")
        and not still_thinking("<think>a</think> B")
        and not still_thinking("B")
    )


def _no_store():
    from octomed_data.images import ImageStore

    return ImageStore(None)


def _stats():
    from evaluation.benchmarks import LoadStats

    return LoadStats()


def test_registry_loads_real_files_with_existing_loaders(shared_data):
    stats = _stats()
    rows = list(iter_benchmark(BENCHMARKS["pubmedqa"], shared_data, _no_store(), stats))
    assert stats.items == len(rows) == 500 and stats.excluded == 500 and not stats.skipped  # test ids only
    assert {r["task_type"] for r in rows} == {"yes_no_maybe"} and {r["split"] for r in rows} == {"test"}
    stats = _stats()
    rows = list(iter_benchmark(BENCHMARKS["mmlu_medical"], shared_data, _no_store(), stats))
    # 1089 items; MMLU repeats some questions across subjects (same content -> same question_id).
    assert stats.items == len(rows) == 1089 and len({r["input_file"] for r in rows}) == 6
    stats = _stats()
    assert list(iter_benchmark(BENCHMARKS["medxpertqa_mm"], shared_data, _no_store(), stats)) == []
    assert stats.skipped == {"missing_image": 2000}  # images are not public: every item skipped, counted
    with pytest.raises(ConfigError, match="unknown benchmark.*nope"):
        get_benchmarks("medqa,nope")
    with pytest.raises(ConfigError, match="benchmark data folder not found"):
        resolve_data_dir("/nonexistent/data")


# --------------------------------------------------------------------------- openai backend


def test_openai_sandbox_end_to_end_to_s3(shared_data, s3_bucket):
    """MCQ + PubMedQA + VQA-RAD (real images) + SLAKE (no images) against the loopback sandbox, output on S3."""
    out = f"{s3_bucket}/eval/sandbox"
    with start_sandbox(style="mixed") as sb:
        cfg = EvalConfig(
            model=sb.base_url,
            benchmarks=["medqa", "pubmedqa", "vqa_rad", "slake"],
            data_dir=str(shared_data),
            output_uri=out,
            limit=5,
            seeds=3,
            max_new_tokens=40,  # sandbox traces are ~15-200 tokens: some replies hit the budget
            force_answer_tokens=8,
            concurrency=8,
        )
        result = evaluate(cfg, progress=False)
        log = sb.stats()["log"]
    metrics = storage.read_json(f"{out}/metrics.json")
    assert metrics["protocol"]["temperature"] == 0.6 and metrics["protocol"]["seeds"] == [0, 1, 2]
    assert metrics["backend"]["backend"] == "openai" and metrics["backend"]["served_model_name"] == "sandbox"
    assert storage.read_bytes(f"{out}/reasoning_length.png")[:4] == b"\x89PNG"
    report = storage.read_bytes(f"{out}/report.md").decode()
    assert "OctoMed, arXiv 2511.23269" in report and "| medqa | 5 |" in report and "90.81" in report
    assert "missing_image: 1061" in report

    per = metrics["per_benchmark"]
    assert per["slake"]["items"] == 0 and per["slake"]["skipped_by_reason"] == {"missing_image": 1061}
    assert per["vqa_rad"]["items"] == 5 and per["vqa_rad"]["skipped"] == 0  # the 5 have real images
    assert per["pubmedqa"]["excluded_other_split"] > 0  # non-test PQA-L items read before the 5th test item

    rows = storage.Dataset(result.predictions_uri).read_all().to_pylist()
    assert len(rows) == result.predictions == 3 * 5 * 3
    grouped = _by_benchmark_seed(rows)
    for name in ("medqa", "pubmedqa", "vqa_rad"):
        accs = [sum(r["correct"] for r in grouped[name][s]) / len(grouped[name][s]) for s in (0, 1, 2)]
        assert per[name]["accuracy_per_seed"] == pytest.approx(accs, abs=1e-6)
        assert per[name]["accuracy_mean"] == pytest.approx(statistics.fmean(accs), abs=1e-6)
        assert per[name]["accuracy_std"] == pytest.approx(statistics.stdev(accs), abs=1e-6)
        fails = sum(r["extracted_answer"] is None for s in (0, 1, 2) for r in grouped[name][s])
        assert per[name]["parse_failures"] == fails
        forced = sum(r["forced_end"] for s in (0, 1, 2) for r in grouped[name][s])
        assert per[name]["forced_end"] == forced
    assert {r["task_type"] for r in grouped["vqa_rad"][0]} == {"yes_no_maybe", "open_vqa"}
    for r in rows:
        assert (r["token_f1"] is not None) == (r["task_type"] == "open_vqa")
        assert r["correct"] == (
            r["extracted_answer"] is not None and r["extracted_answer"] == r["gold_answer"]
        )

    # Forced ends: the budget ran out inside <think>; the answer is the continuation after the cue.
    forced = [r for r in rows if r["forced_end"]]
    assert forced and all(r["finish_reason"] == "forced" for r in forced)
    for r in forced:
        head, tail = r["response"].split(FORCE_CUE)
        assert still_thinking(head) and tail.endswith("}")
        assert is_correct(r["extracted_answer"], tail[:-1], r["task_type"])  # read from the continuation
    assert len(log) == 3 * 5 * 3 + len(forced)  # one request per (item, seed) + one per forced end
    assert len({e["seed"] for e in log}) > 15  # per-item, per-seed request seeds


def test_unparseable_replies_count_as_wrong(shared_data, tmp_path):
    with start_sandbox(faults=FaultConfig(refusal=1.0)) as sb:
        cfg = EvalConfig(
            model=sb.base_url, benchmarks="medbullets_op4", data_dir=str(shared_data),
            output_uri=str(tmp_path / "out"), limit=3, seeds=2,
        )  # fmt: skip
        result = evaluate(cfg, progress=False)
    m = result.per_benchmark["medbullets_op4"]
    assert m["accuracy_mean"] == 0.0 and m["parse_failures"] == 6 and m["parse_failure_rate"] == 1.0


# --------------------------------------------------------------------------- hf backend


def test_hf_tiny_model_forced_end_and_seeds(shared_data, tmp_path):
    """Tiny random Qwen2 through HF generate: budget exhausted inside <think> -> forced, per-seed sampling."""
    from evaluation.backends.hf import HFBackend
    from training.tiny import build_text_model

    model = build_text_model(tmp_path / "tiny")
    cfg = EvalConfig(
        model=str(model),
        benchmarks=["medqa", "pubmedqa", "vqa_rad"],
        data_dir=str(shared_data),
        output_uri=str(tmp_path / "out"),
        limit=2,
        seeds=2,
        max_new_tokens=6,
        force_answer_tokens=3,
        prefill_think=True,  # a random model never opens <think> by itself
        batch_size=4,
    )
    result = evaluate(cfg, progress=False)
    per = result.per_benchmark
    assert per["vqa_rad"]["items"] == 0 and per["vqa_rad"]["skipped_by_reason"] == {"text_only_model": 2}
    assert per["medqa"]["predictions"] == per["pubmedqa"]["predictions"] == 4
    rows = storage.Dataset(result.predictions_uri).read_all().to_pylist()
    forced = [r for r in rows if r["forced_end"]]
    assert forced, "a 6-token budget must end inside the thought"
    items = {
        q["question_id"]: q
        for name in ("medqa", "pubmedqa")
        for q in iter_benchmark(BENCHMARKS[name], shared_data, _no_store(), _stats(), limit=2)
    }
    for r in rows:
        assert r["response"].startswith("<think>\n")
        assert r["completion_tokens"] <= 6 + (3 if r["forced_end"] else 0)
        assert (FORCE_CUE in r["response"]) == r["forced_end"]
        if r["forced_end"]:  # the whole first pass was reasoning, counted in generated tokens
            assert r["reasoning_tokens"] == 6 and r["finish_reason"] == "forced" and r["think_closed"]
        q = items[r["question_id"]]
        assert r["extracted_answer"] == extract_answer(r["response"], q["task_type"], options_of(q)).answer
    assert (Path(result.output_uri) / "report.md").is_file()

    # Seeded sampling: the same seed gives the same replies, another seed other ones.
    backend = HFBackend(str(model), SamplingProtocol(max_new_tokens=8, force_end=False), cache_dir=tmp_path)
    stats = _stats()
    items = list(iter_benchmark(BENCHMARKS["medqa"], shared_data, _no_store(), stats, limit=3))
    a, b = backend.generate(items, [7, 7]), backend.generate(items, [8])
    assert [g.text for g in a[0]] == [g.text for g in a[1]] and [g.text for g in a[0]] != [
        g.text for g in b[0]
    ]


def test_hf_tiny_vl_model_on_real_vqa_rad_images(shared_data, tmp_path):
    from training.tiny import build_vl_model

    model = build_vl_model(tmp_path / "vl")
    result = evaluate(
        EvalConfig(
            model=str(model), benchmarks=["vqa_rad"], data_dir=str(shared_data), output_uri=str(tmp_path / "o"),
            limit=2, seeds=1, max_new_tokens=4, max_pixels=64 * 64,
        ),
        progress=False,
    )  # fmt: skip
    assert result.per_benchmark["vqa_rad"]["items"] == 2 and result.predictions == 2


# --------------------------------------------------------------------------- CLI


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip()


def test_cli_list_and_one_line_errors(shared_data, tmp_path, capsys):
    rc, out, _ = _cli(["eval", "--list", "--data-dir", str(shared_data)], capsys)
    assert rc == 0 and all(name in out for name in BENCHMARKS) and "90.81" in out

    base = ["eval", "--data-dir", str(shared_data), "--out", str(tmp_path / "o"), "--no-progress"]
    cases = [
        (["--model", str(tmp_path), "--benchmarks", "medqa,nope"], "unknown benchmark(s) nope"),
        (["--model", str(tmp_path / "missing"), "--benchmarks", "medqa"], "is not a local model folder"),
        (["--model", "http://127.0.0.1:9/v1", "--benchmarks", "medqa"], "cannot list models at http://127.0.0.1:9/v1"),
        (["--model", str(tmp_path), "--benchmarks", "pmc_vqa"], "PMC-VQA is distributed on the HF hub only"),
        (["--model", str(tmp_path), "--benchmarks", "medqa", "--backend", "vllm"], "is not a local model folder"),
        (["--model", str(tmp_path), "--benchmarks", "medqa", "--seeds", "0"], "invalid EvalConfig in eval flags"),
        (["--model", str(tmp_path), "--benchmarks", "medqa", "--max-request-error-rate", "2"], "max_request_error_rate"),
    ]  # fmt: skip
    for extra, message in cases:
        rc, _, err = _cli(base + extra, capsys)
        assert rc == 2 and err.startswith("error: ") and "\n" not in err and message in err, (extra, err)
    rc, _, err = _cli(
        ["eval", "--model", str(tmp_path), "--benchmarks", "medqa", "--data-dir", str(tmp_path / "none")],
        capsys,
    )
    assert rc == 2 and "benchmark data folder not found" in err and "\n" not in err


def test_api_key_never_in_outputs(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("EVAL_TEST_KEY", "sk-verysecretvalue123")
    with start_sandbox() as sb:
        cfg = EvalConfig(
            model=sb.base_url, benchmarks="medqa", data_dir=str(shared_data), output_uri=str(tmp_path / "o"),
            limit=1, seeds=1, api_key_env="EVAL_TEST_KEY", prompting="direct",
        )  # fmt: skip
        result = evaluate(cfg, progress=False)
    rows = storage.Dataset(result.predictions_uri).read_all().to_pylist()
    assert [r["prompt_version"] for r in rows] == ["octomed-direct-v1"]
    assert "without explanation" in system_prompt("text_mcq", "direct") != system_prompt("text_mcq")
    for f in (tmp_path / "o").rglob("*"):
        if f.is_file():
            assert b"sk-verysecretvalue123" not in f.read_bytes(), f
    assert "sk-verysecret" not in repr(cfg) and result.predictions == 1


# --------------------------------------------------------------------------- review fixes


def test_unfinished_thought_is_no_answer_and_a_parse_failure():
    """A reply cut (or stopped) inside <think> has no answer, whatever the reasoning says so far."""
    row = next(iter_benchmark(BENCHMARKS["medqa"], resolve_data_dir(), _no_store(), _stats(), limit=1))
    cut = Generation(f"<think>So far the answer is {row['answer']}, but let me check", 40, 40, "length")
    p = score_generation(row, cut, benchmark="medqa", seed=0, version="v")
    assert p["extracted_answer"] is None and p["no_answer_reason"] == "unfinished_thought"
    assert p["correct"] is False and p["think_closed"] is False
    m = MetricsAccumulator()
    m.add(p)
    assert m.benchmark_summary("medqa")["parse_failures"] == 1
    # A template that opened the thought itself: only the close arrives, the answer after it counts.
    ok = extract_answer(
        f"reasoning ...</think>\n\nFinal answer: \\boxed{{{row['answer']}}}", "text_mcq", options_of(row)
    )
    assert ok.answer == row["answer"]


def test_openai_reply_with_template_opened_thought():
    """No <think> but a </think>: the reply is put back as <think>...</think> as the HF backend does."""
    from types import SimpleNamespace

    from evaluation.backends import reasoning_span
    from evaluation.backends.openai import read_reply

    def response(content: str, finish: str, reasoning: str | None = None):
        msg = SimpleNamespace(
            content=content, model_extra={"reasoning_content": reasoning} if reasoning else {}
        )
        usage = SimpleNamespace(completion_tokens=100, completion_tokens_details=None)
        return SimpleNamespace(choices=[SimpleNamespace(message=msg, finish_reason=finish)], usage=usage)

    text, finish, tokens, reasoning = read_reply(
        response("weighing A vs B ...</think>\n\nAnswer: B", "stop"), ""
    )
    assert text.startswith("<think>") and reasoning_span(text) == ("weighing A vs B ...", True)
    assert 0 < reasoning < tokens and not still_thinking(text)
    # Cut off with the thought in reasoning_content: still thinking, so it gets forced (or no answer).
    text, *_ = read_reply(response("", "length", reasoning="weighing A vs B"), "")
    assert still_thinking(text) and extract_answer(text, "text_mcq").reason == "unfinished_thought"


def test_no_force_end_cut_replies_have_no_answer(shared_data, tmp_path):
    with start_sandbox(style="mixed") as sb:
        cfg = EvalConfig(
            model=sb.base_url, benchmarks="medqa", data_dir=str(shared_data), output_uri=str(tmp_path / "o"),
            limit=4, seeds=2, max_new_tokens=20, force_end_of_thinking=False, concurrency=8,
        )  # fmt: skip
        result = evaluate(cfg, progress=False)
    rows = storage.Dataset(result.predictions_uri).read_all().to_pylist()
    cut = [r for r in rows if r["finish_reason"] == "length"]
    assert cut and not any(r["forced_end"] for r in rows)
    assert all(r["extracted_answer"] is None and r["no_answer_reason"] == "unfinished_thought" for r in cut)
    assert result.per_benchmark["medqa"]["parse_failures"] >= len(cut)


def test_forced_answer_behind_reasoning_parser(shared_data, tmp_path):
    """vLLM --reasoning-parser deepseek_r1 returns the continuation "B}" as reasoning (vLLM >= 0.10)."""
    with start_sandbox(
        style="reasoning_content", continuation_as_reasoning=True, server="vllm", reasoning_field="reasoning"
    ) as sb:
        cfg = EvalConfig(
            model=sb.base_url, benchmarks="medqa", data_dir=str(shared_data), output_uri=str(tmp_path / "o"),
            limit=4, seeds=2, max_new_tokens=8, force_answer_tokens=8, concurrency=8,
        )  # fmt: skip
        result = evaluate(cfg, progress=False)
        log = sb.stats()["log"]
    rows = storage.Dataset(result.predictions_uri).read_all().to_pylist()
    assert len(rows) == 8 and all(r["forced_end"] for r in rows)  # an 8-token budget ends mid-thought
    for r in rows:
        head, tail = r["response"].split(FORCE_CUE)
        assert "<think>" not in tail and tail.endswith("}")  # joined raw, not wrapped as a thought
        assert r["extracted_answer"] == tail[:-1] and r["extract_method"] == "boxed"
    # vLLM sampling fields sent by default, so the server cannot fall back to generation_config.
    assert all(e["sampling"]["top_k"] == -1 and e["sampling"]["repetition_penalty"] == 1.0 for e in log)
    metrics = storage.read_json(f"{tmp_path / 'o'}/metrics.json")
    assert metrics["sampling"]["extra_body"] == {"top_k": -1, "repetition_penalty": 1.0}


def test_request_errors_fail_the_run_or_are_shown(shared_data, tmp_path):
    from evaluation.backends.openai import sampling_extras_for
    from evaluation.harness import TooManyRequestErrors

    faults = FaultConfig(seed=1, bad_request=0.3)  # 400 on ~30% of requests, every attempt
    base = dict(benchmarks="medqa", data_dir=str(shared_data), limit=4, seeds=3, concurrency=8)
    with start_sandbox(faults=faults) as sb:
        with pytest.raises(TooManyRequestErrors) as exc:
            evaluate(EvalConfig(model=sb.base_url, output_uri=str(tmp_path / "a"), **base), progress=False)
        message = str(exc.value)
        assert (
            "\n" not in message and "of 12 replies had a request error" in message and "HTTP 400" in message
        )
        result = evaluate(
            EvalConfig(
                model=sb.base_url, output_uri=str(tmp_path / "b"), max_request_error_rate=1.0,
                sampling_extras="off", **base,
            ),
            progress=False,
        )  # fmt: skip
        log = sb.stats()["log"]
    rows = storage.Dataset(result.predictions_uri).read_all().to_pylist()
    errors = sum(r["error"] is not None for r in rows)
    assert 0 < errors < 12 and result.request_errors == errors
    assert result.per_benchmark["medqa"]["request_errors"] == errors
    report = (tmp_path / "b" / "report.md").read_text()
    assert "| Request errors |" in report and f"Request errors: {errors} of 12 replies" in report
    assert not any("top_k" in e["sampling"] for e in log[-12:])  # sampling_extras: off
    assert sampling_extras_for("openai", "auto") == {} and sampling_extras_for("generic", "auto") == {}
    assert sampling_extras_for("vllm", "auto") == {"top_k": -1, "repetition_penalty": 1.0}
    assert sampling_extras_for("llamacpp", "auto") == {"top_k": 0, "repeat_penalty": 1.0}
    assert sampling_extras_for("generic", "on") == {"top_k": -1, "repetition_penalty": 1.0}
    assert sampling_extras_for("vllm", "off") == {}
    from flows.train import _TABLE_COLUMNS

    assert "request_errors" in _TABLE_COLUMNS


def test_malformed_question_rows_are_counted_not_fatal(tmp_path):
    """Unknown task type / no answer / no options are skipped by reason; no images column = no images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def q(i: int, **over):
        row = {
            "question_id": f"q{i}", "source": "mine", "split": "test", "task_type": "text_mcq",
            "question": f"Which drug number {i}?", "answer": "A",
            "options": [{"label": "A", "text": "aspirin"}, {"label": "B", "text": "insulin"}],
            "input_file": "x", "record_index": i,
        }  # fmt: skip
        row.update(over)
        return row

    rows = [q(0), q(1, task_type="essay"), q(2, answer=None), q(3, options=[]), q(4), q(5, source=None)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "questions.parquet")  # no images column
    with start_sandbox() as sb:
        cfg = EvalConfig(
            model=sb.base_url, questions_uri=str(tmp_path / "questions.parquet"), output_uri=str(tmp_path / "o"),
            seeds=1,
        )  # fmt: skip
        result = evaluate(cfg, progress=False)
    mine = result.per_benchmark["mine"]
    assert mine["items"] == 2 and mine["predictions"] == 2
    assert mine["skipped_by_reason"] == {"missing_answer": 1, "missing_options": 1, "unknown_task_type": 1}
    assert result.per_benchmark["(no source)"]["skipped_by_reason"] == {"missing_source": 1}


def _qwen_style_generation_config(model_dir: Path, **over) -> None:
    """The generation_config.json Qwen2.5-VL-7B-Instruct ships (greedy in effect: top_k 1)."""
    import json

    path = model_dir / "generation_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05, **over)
    path.write_text(json.dumps(cfg))


def test_hf_samples_despite_qwen_generation_config_and_stops_on_every_eos(shared_data, tmp_path):
    from evaluation.backends.hf import HFBackend, cut_at_stop
    from training.tiny import build_text_model

    model = build_text_model(tmp_path / "tiny")
    items = list(iter_benchmark(BENCHMARKS["medqa"], shared_data, _no_store(), _stats(), limit=2))
    protocol = SamplingProtocol(max_new_tokens=8, force_end=False)
    _qwen_style_generation_config(model)
    backend = HFBackend(str(model), protocol, cache_dir=tmp_path)
    out = backend.generate(items, [1, 2, 3])
    assert len({tuple(g.text for g in seed) for seed in out}) == 3, "every seed was greedy"
    sampling = backend.describe()["sampling"]
    assert (
        sampling["top_k"] == "off"
        and sampling["repetition_penalty"] == 1.0
        and sampling["temperature"] == 0.6
    )
    assert sampling["ignored_checkpoint_generation_config"]["top_k"] == 1

    # Every id of the checkpoint's eos list stops generation and reads as finish=stop (here the
    # list is the whole vocabulary, so the first token ends every reply).
    eos = backend.tokenizer.eos_token_id
    vocab = backend.model.config.get_text_config().vocab_size
    _qwen_style_generation_config(model, eos_token_id=[t for t in range(vocab) if t != eos])
    backend = HFBackend(str(model), protocol, cache_dir=tmp_path)
    assert eos in backend.eos_ids and len(backend.eos_ids) == vocab
    gens = backend.generate(items, [1])[0]
    assert all(g.finish_reason == "stop" and g.completion_tokens == 0 for g in gens)
    assert cut_at_stop([5, 6, 9, 7], [9, 3], 0) == ([5, 6], "stop")
    assert cut_at_stop([5, 0, 6], [9, 3], 0) == ([5, 6], "length")


def test_llamacpp_endpoint_gets_no_rejected_parameter(shared_data, tmp_path):
    """llama.cpp answers top_k=-1 with HTTP 500: its kind is detected and top-k off is spelled top_k=0."""
    base = dict(benchmarks="medqa", data_dir=str(shared_data), limit=3, seeds=2, concurrency=4)
    with start_sandbox(server="llamacpp") as sb:
        result = evaluate(
            EvalConfig(model=sb.base_url, output_uri=str(tmp_path / "a"), **base), progress=False
        )
        log = sb.stats()["log"]
        assert result.request_errors == 0
        assert log and all(
            e["sampling"].get("top_k") == 0 and e["sampling"]["repeat_penalty"] == 1.0 for e in log
        )
        # Told it is a vLLM server, the same endpoint rejects every request, and the cause is shown whole.
        from evaluation.backends import EndpointUnreachable

        with pytest.raises(EndpointUnreachable) as exc:
            evaluate(
                EvalConfig(model=sb.base_url, output_uri=str(tmp_path / "b"), server="vllm", **base),
                progress=False,
            )
    assert "greater than or equal to 0" in str(exc.value) and "\n" not in str(exc.value)
    metrics = storage.read_json(f"{tmp_path / 'a'}/metrics.json")
    assert metrics["backend"]["server"] == "llamacpp"


def test_direct_prompting_never_prefills_think(shared_data, tmp_path, monkeypatch):
    """Issue 22: direct prompting asks for no reasoning, so no reply is opened with ``<think>`` even
    when the protocol's ``prefill_think`` is on (the demo recipe sets it for chain-of-thought); the
    cot protocol keeps the prefill. Checked on the messages sent to an endpoint (the sandbox) and on
    the protocol metrics.json records."""
    from evaluation.backends.openai import OpenAIBackend

    sent: dict[str, list] = defaultdict(list)
    original = OpenAIBackend._messages

    def spy(self, row):
        msgs = original(self, row)
        sent[self.protocol.prompting].append(msgs)
        return msgs

    monkeypatch.setattr(OpenAIBackend, "_messages", spy)
    with start_sandbox() as sb:
        for prompting in ("cot", "direct"):
            cfg = EvalConfig(
                model=sb.base_url, benchmarks="medqa", data_dir=str(shared_data),
                output_uri=str(tmp_path / prompting), limit=2, seeds=1, prompting=prompting,
                prefill_think=True,
            )  # fmt: skip
            result = evaluate(cfg, progress=False)
            metrics = storage.read_json(storage.join(result.output_uri, "metrics.json"))
            assert metrics["protocol"]["prefill_think"] is (prompting == "cot")
    assert len(sent["cot"]) == len(sent["direct"]) == 2
    for msgs in sent["direct"]:
        assert [m["role"] for m in msgs] == ["system", "user"]
        assert msgs[0]["content"] == system_prompt("text_mcq", "direct")
        assert "<think>" not in str(msgs)
    for msgs in sent["cot"]:
        assert msgs[-1] == {"role": "assistant", "content": "<think>\n"}
        assert msgs[0]["content"] == system_prompt("text_mcq")
