"""Build the third-party answer corpus: REAL model replies to medical MCQs with published labels.

Reads fetched git mirrors (bare git directories, as ``fetch`` leaves them) of the public
repositories below and writes ``tests/answer_corpus/third_party/{tests,heldout}.jsonl.gz``:

* ``TIGER-AI-Lab/MMLU-Pro`` (Apache-2.0): per-model CoT outputs with the authors' parsed ``pred``,
  health category only (MMLU-Pro's medical subset, 10 options A-J). 5-shot local/API runs
  (``eval_results/model_outputs_*_5shots.zip``) and the GPT-4o / DeepSeek / MiniMax result files.
* ``Teddy-XiongGZ/MIRAGE`` (public domain, NCBI notice): MedRAG JSON replies of GPT-3.5 and GPT-4
  on MedQA, MedMCQA, MMLU-medical and PubMedQA, CoT and RAG; no per-reply label is stored, so the
  published label is the one MIRAGE's own ``src/utils.py::locate_answer`` computes (re-implemented
  here: split at the last ``"answer_choice": "``, then its ordered regexes, default "A").
* ``MedARC-AI/med-lm-envs`` (MIT): vf-eval ``results.jsonl`` of Mistral-small on MetaMedQA (bare
  letters, each with the environment's accuracy reward).
* ``starmpcc/medARC-QA`` (Apache-2.0): M-ARC, MMLU-Pro-style CoT replies of 21 models (QwQ-32B and an
  R1 distill with ``</think>`` reasoning, the DeepSeek-R1 / o1 / o3-mini APIs, GPT-4o, Claude-3, ...)
  with the authors' ``pred``.
* ``redagavin/cot_faithfulness`` (no licence stated): DiagnosisArena replies of
  DeepSeek-R1-Distill-Llama-8B (``</think>``, ``\\boxed{X}``) and OLMo-2-7B with the authors' parsed answer.
* ``MMMU-Benchmark/MMMU`` (Apache-2.0): GPT-4o's MMMU-Pro replies (CoT and direct; image questions,
  up to 10 options) on the five medical subjects, with the authors' parsed ``pred_indexs``.

Each row's ``expected`` is the label the reply states as its final answer, or null. It starts from
the published label; where THE extractor (``octomed_data.answers``) and the published label disagree,
the row is adjudicated: by a hand decision from ``adjudications.jsonl`` (``adjudicated_by: hand``)
when there is one, else by the conservative rules of :func:`_rule_adjudicate`, which look only at
the reply's last lines (``adjudicated_by: rule``), each with a note. Rows whose adjudication stays
open are left out and counted.

    .venv/bin/python benchmarks/build_answer_corpus.py \\
        --mmlu-pro /work/.mirror/TIGER-AI-Lab+MMLU-Pro/repo \\
        --mirage /work/.mirror/Teddy-XiongGZ+MIRAGE/repo \\
        --medarc /work/.mirror/MedARC-AI+med-lm-envs/repo \\
        --flare /work/.mirror/QingxuanKong+FLARE-Med-New/repo \\
        --cot-faithfulness /work/.mirror/redagavin+cot_faithfulness/repo \\
        --medarc-qa /work/.mirror/starmpcc+medARC-QA/repo \\
        --mmmu /work/.mirror/MMMU-Benchmark+MMMU/repo
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from octomed_data.answers import extract_answer, is_correct  # noqa: E402

OUT = ROOT / "tests" / "answer_corpus" / "third_party"
LETTERS = "ABCDEFGHIJ"

# MMLU-Pro commits: HEAD of the snapshot holds the zips; the per-model result folders were removed
# later and are read at the commit that added them.
MMLU_PRO_RESULTS = {
    # model dir: (commit, family, model name)
    "gpt4o": ("ff991b5b7f14a383fd41da3987447ab6c08bf138", "openai-gpt", "gpt-4o"),
    "deepseek": ("ff991b5b7f14a383fd41da3987447ab6c08bf138", "deepseek", "deepseek-chat (V2)"),
    "merged": ("4885ba7d293b6615be332ca69a9df773fdf67dce", "minimax", "MiniMax (eval_results/merged)"),
}
# zip stem -> family
MMLU_PRO_ZIPS = {
    "DeepSeek-Coder-V2": "deepseek",
    "Llama-2-13b-hf": "llama",
    "Llama-2-70b-hf": "llama",
    "Llama-2-7b-hf": "llama",
    "Meta-Llama-3-70B": "llama",
    "Meta-Llama-3-8B": "llama",
    "Meta-Llama-3_1-70B-Instruct": "llama",
    "Meta-Llama-3_1-70B": "llama",
    "Meta-Llama-3_1-8B-Instruct": "llama",
    "Meta-Llama-3_1-8B": "llama",
    "Mistral-7B-Instruct-v0.1": "mistral",
    "Mistral-7B-Instruct-v0.2": "mistral",
    "Mistral-7B-v0.1": "mistral",
    "Mistral-7B-v0.2-hf": "mistral",
    "Mixtral-8x7B-Instruct-v0.1": "mistral",
    "Mixtral-8x7B-v0.1": "mistral",
    "mathstral-7B": "mistral",
    "Phi-3-mini-4k-instruct": "phi",
    "Qwen1.5-110B": "qwen",
    "Qwen1.5-72B-Chat": "qwen",
    "Qwen1.5-7B-Chat": "qwen",
    "Yi-34B": "yi",
    "Yi-6B": "yi",
    "Yi-6b-Chat": "yi",
    "c4ai-command-r-v01": "cohere",
    "gemini-1.5-flash-002": "gemini",
    "gemini-1.5-pro-002": "gemini",
    "gemma-7b": "gemma",
    "jamba-1.5-large": "jamba",
}
# Families the test suite sees; every other family is held out for the benchmark only.
TEST_FAMILIES = {"openai-gpt", "llama", "qwen", "gemini", "phi", "olmo"}
HELDOUT_FAMILIES = {
    "deepseek",
    "mistral",
    "minimax",
    "yi",
    "cohere",
    "gemma",
    "jamba",
    "deepseek-r1",
    "claude",
}

PER_ZIP_MODEL = 120  # sampled replies per 5-shot model (818 health questions each)
PER_RESULT_MODEL = 400  # sampled replies per 0-shot result file (gpt-4o, deepseek, minimax)
PER_MIRAGE_RUN = 110  # per (benchmark, cot|rag, model)
PER_MEDARC = 150


def _git(mirror: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(mirror), *args], check=True, capture_output=True).stdout


def _head(mirror: Path) -> str:
    return _git(mirror, "rev-parse", "HEAD").decode().strip()


def _key(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


def _sample(rows: list[dict], n: int) -> list[dict]:
    """Deterministic sample: the n rows with the smallest sha1 of their id."""
    return sorted(rows, key=lambda r: _key(r["id"]))[:n]


# ---------------------------------------------------------------- MMLU-Pro
def _mmlu_pro_level(text: str) -> str:
    """Which of MMLU-Pro's three extraction stages (evaluate_from_*.py) produces its ``pred``."""
    if re.search(r"answer is \(?([A-J])\)?", text):
        return "answer_is"
    if re.search(r".*[aA]nswer:\s*([A-J])", text):
        return "answer_colon"
    if re.search(r"\b[A-J]\b(?!.*\b[A-J]\b)", text, re.DOTALL):
        return "last_letter"
    return "none"


def _mmlu_pro_row(src: str, lic: str, model: str, family: str, e: dict, text: str) -> dict:
    options = e["options"]
    if isinstance(options, str):  # the result files store the list as its Python repr
        import ast

        options = ast.literal_eval(options)
    pred = e.get("pred") or None
    return {
        "id": f"mmlu-pro:{model}:{e['question_id']}",
        "source": src,
        "licence": lic,
        "model": model,
        "family": family,
        "benchmark": "mmlu_pro_health",
        "task_type": "text_mcq",
        "options": [[LETTERS[i], str(o)] for i, o in enumerate(options)],
        "gold": e["answer"],
        "reply": text,
        "published": pred,
        "published_how": f"MMLU-Pro pred ({_mmlu_pro_level(text)})",
    }


def load_mmlu_pro(mirror: Path) -> list[dict]:
    head = _head(mirror)
    lic = "Apache-2.0 (TIGER-AI-Lab/MMLU-Pro LICENSE)"
    rows: list[dict] = []
    for stem, family in MMLU_PRO_ZIPS.items():
        path = f"eval_results/model_outputs_{stem}_5shots.zip"
        data = _git(mirror, "show", f"{head}:{path}")
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            (name,) = [n for n in z.namelist() if n.endswith(".json")]
            entries = json.loads(z.read(name))
        if isinstance(entries, dict):  # some runs store {category: [entries]}
            entries = [e for v in entries.values() if isinstance(v, list) for e in v]
        src = f"TIGER-AI-Lab/MMLU-Pro@{head}:{path}"
        got = [
            _mmlu_pro_row(src, lic, stem, family, e, e.get("generated_text") or e.get("model_outputs") or "")
            for e in entries
            if isinstance(e, dict) and e.get("category") == "health"  # DeepSeek-Coder-V2 has stray strings
        ]
        rows += _sample(got, PER_ZIP_MODEL)
    for folder, (commit, family, model) in MMLU_PRO_RESULTS.items():
        path = f"eval_results/{folder}/health_result.json"
        entries = json.loads(_git(mirror, "show", f"{commit}:{path}"))
        src = f"TIGER-AI-Lab/MMLU-Pro@{commit}:{path}"
        got = [
            _mmlu_pro_row(src, lic, model, family, e, e.get("response") or e.get("model_outputs") or "")
            for e in entries
        ]
        rows += _sample(got, PER_RESULT_MODEL)
    return rows


# ---------------------------------------------------------------- MIRAGE
def _mirage_locate(sentence: str) -> str | None:
    """MIRAGE src/utils.py locate_answer, re-implemented: ordered regexes (None where MIRAGE defaults to "A")."""
    for pat in (
        (r"^\s*(A|B|C|D)$"),
        (r"^\s*(A|B|C|D) or"),
        (r"^\s*(A|B|C|D) and"),
        (r"^\s*(A|B|C|D)/"),
        (r"^\s*(A|B|C|D),"),
        (r"[Oo]ption (A|B|C|D)"),
        (r":\s*(A|B|C|D)"),
        (r"^\s*(A|B|C|D)\."),
        (r"^\s*(A|B|C|D)\""),
        (r"^\s*(A|B|C|D):"),
    ):
        found = re.findall(pat, sentence)
        if found:
            return found[0].upper()
    return None


MIRAGE_BENCH = {"medqa": "medqa", "medmcqa": "medmcqa", "mmlu": "mmlu_medical", "pubmedqa": "pubmedqa"}


def mirage_questions(shared: Path) -> dict[str, dict[str, dict]]:
    """MIRAGE's question ids -> {options, answer}, from the public benchmark files in shared/data.

    MIRAGE's own ``benchmark.json`` is over the snapshot size limit; its ids name the same items:
    MedQA ``test_0000`` = line 0 of the 4-option US test file, MedMCQA ``dev_<id>``, MMLU
    ``test_<subject>-000`` = row 0 of ``<subject>_test.csv``, PubMedQA ``test_<pmid>``.
    """
    import csv

    out: dict[str, dict[str, dict]] = {k: {} for k in MIRAGE_BENCH}
    for i, line in enumerate((shared / "medqa" / "phrases_no_exclude_test.jsonl").read_text().splitlines()):
        e = json.loads(line)
        out["medqa"][f"{i:04d}"] = {
            "question": e["question"],
            "options": e["options"],
            "answer": e["answer_idx"],
        }
    for line in (shared / "medmcqa" / "dev.json").read_text().splitlines():
        e = json.loads(line)
        opts = {"A": e["opa"], "B": e["opb"], "C": e["opc"], "D": e["opd"]}
        out["medmcqa"][e["id"]] = {"question": e["question"], "options": opts, "answer": "ABCD"[e["cop"] - 1]}
    for f in sorted((shared / "mmlu_medical").glob("*_test.csv")):
        subject = f.name[: -len("_test.csv")]
        with f.open(newline="") as fh:
            for i, r in enumerate(csv.reader(fh)):
                opts = dict(zip("ABCD", r[1:5], strict=True))
                out["mmlu"][f"{subject}-{i:03d}"] = {"question": r[0], "options": opts, "answer": r[5]}
    for pmid, e in json.loads((shared / "pubmedqa" / "ori_pqal.json").read_text()).items():
        word = e["final_decision"]
        out["pubmedqa"][pmid] = {
            "question": e["QUESTION"],
            "options": {"A": "yes", "B": "no", "C": "maybe"},
            "answer": {"yes": "A", "no": "B", "maybe": "C"}[word],
        }
    return out


def load_mirage(mirror: Path, shared: Path) -> list[dict]:
    head = _head(mirror)
    lic = "Public domain (NCBI PUBLIC DOMAIN NOTICE, Teddy-XiongGZ/MIRAGE LICENSE)"
    bench = mirage_questions(shared)
    names = _git(mirror, "ls-tree", "-r", "--name-only", head, "prediction").decode().splitlines()
    runs: dict[tuple[str, str, str], list[str]] = {}
    for p in names:
        parts = p.split("/")
        if len(parts) < 5 or parts[1] not in MIRAGE_BENCH:
            continue
        mode = "cot" if parts[2] == "cot" else "rag"
        runs.setdefault((parts[1], mode, parts[4]), []).append(p)
    rows: list[dict] = []
    for (ds, mode, model), paths in sorted(runs.items()):
        chosen = sorted(paths, key=lambda p: _key(p))[:PER_MIRAGE_RUN]
        for p in sorted(chosen):
            qid = Path(p).stem.split("_", 1)[1]
            q = bench[ds].get(qid)
            if q is None:
                raise SystemExit(f"MIRAGE id {ds}/{qid} not found in the shared benchmark files")
            replies = json.loads(_git(mirror, "show", f"{head}:{p}"))
            if not replies:  # an empty list: no reply was recorded
                continue
            reply = replies[0] if isinstance(replies, list) else replies
            if not isinstance(reply, str):
                continue
            rows.append(_mirage_row(f"Teddy-XiongGZ/MIRAGE@{head}:{p}", lic, ds, mode, model, qid, q, reply))
    return rows


def _mirage_row(src: str, lic: str, ds: str, mode: str, model: str, qid: str, q: dict, reply: str) -> dict:
    located = _mirage_locate(reply.split('"answer_choice": "')[-1].strip())
    label = located or "A"
    opts = [[k, str(v)] for k, v in sorted(q["options"].items())]
    row = {
        "id": f"mirage:{ds}:{mode}:{model}:{qid}",
        "source": src,
        "licence": lic,
        "model": f"{model} ({mode})",
        "family": "llama" if "llama" in model.lower() else "openai-gpt",
        "benchmark": MIRAGE_BENCH[ds],
        "task_type": "text_mcq",
        "options": opts,
        "gold": q["answer"],
        "reply": reply,
        "published": label,
        "published_how": "MIRAGE locate_answer after the last answer_choice"
        + (" (matched)" if located else " (none matched: MIRAGE's default A)"),
    }
    if ds == "pubmedqa":
        words = dict(opts)
        row.update(task_type="yes_no_maybe", gold=words[q["answer"]], published=words.get(label))
    return row


FLARE_COMMIT = "4abc327f1a18e187cc937b4d92d33ad752b109b0"


def load_flare(mirror: Path) -> list[dict]:
    """Llama-3.2-3B-Instruct MedRAG replies (MedQA, MMLU-medical), each file with its question.

    QingxuanKong/FLARE-Med-New states no licence of its own; its MIRAGE/MedRAG folders carry the
    NCBI public-domain notice. The prediction files were deleted later; read at FLARE_COMMIT.
    """
    lic = "none stated upstream (QingxuanKong/FLARE-Med-New; its MIRAGE/ folder carries MIRAGE's NCBI public-domain notice)"
    names = (
        _git(mirror, "ls-tree", "-r", "--name-only", FLARE_COMMIT, "MIRAGE/prediction").decode().splitlines()
    )
    rows: list[dict] = []
    for ds in ("medqa", "mmlu"):
        prefix = f"MIRAGE/prediction/{ds}/rag_32/meta-llama/Llama-3.2-3B-Instruct/"
        paths = sorted((n for n in names if n.startswith(prefix)), key=_key)[: PER_MIRAGE_RUN * 2]
        for p in sorted(paths):
            e = json.loads(_git(mirror, "show", f"{FLARE_COMMIT}:{p}"))
            q = {"options": e["options"], "answer": e["answer"]}
            row = _mirage_row(
                f"QingxuanKong/FLARE-Med-New@{FLARE_COMMIT}:{p}",
                lic,
                ds,
                "rag",
                "Llama-3.2-3B-Instruct",
                str(e["id"]),
                q,
                e["predict"],
            )
            row["id"] = f"flare:{ds}:Llama-3.2-3B-Instruct:{e['id']}"
            rows.append(row)
    return rows


# ---------------------------------------------------------------- MedARC
def load_medarc(mirror: Path) -> list[dict]:
    commit = "101735c07fca84063a6a9a6a8b01b44b2269423d^"
    resolved = _git(mirror, "rev-parse", commit).decode().strip()
    lic = "MIT (MedARC-AI/med-lm-envs LICENSE)"
    base = "outputs/evals/metamedqa--mistral-small-latest"
    names = _git(mirror, "ls-tree", "-r", "--name-only", resolved, base).decode().splitlines()
    rows: list[dict] = []
    for p in sorted(n for n in names if n.endswith("results.jsonl")):
        run = p.split("/")[-2]
        for line in _git(mirror, "show", f"{resolved}:{p}").decode().splitlines():
            e = json.loads(line)
            prompt = e["prompt"][-1]["content"]
            opts = re.findall(r"^([A-F])\. (.+)$", prompt.split("Options:")[-1], re.MULTILINE)
            reply = e["completion"][-1]["content"] if e["completion"] else ""
            correct = bool(e.get("accuracy_reward", e.get("reward")))
            rows.append(
                {
                    "id": f"medarc:metamedqa:{run}:{e['id']}",
                    "source": f"MedARC-AI/med-lm-envs@{resolved}:{p}",
                    "licence": lic,
                    "model": "mistral-small-latest",
                    "family": "mistral",
                    "benchmark": "metamedqa",
                    "task_type": "text_mcq",
                    "options": [[k, v.strip()] for k, v in opts],
                    "gold": e["answer"],
                    "reply": reply,
                    # The environment stores only a reward: a correct reply states the gold label.
                    "published": e["answer"] if correct else None,
                    "published_how": "vf-eval accuracy_reward (1 = gold label; 0 = not the gold, label unknown)",
                }
            )
    return _sample(rows, PER_MEDARC)


# ---------------------------------------------------------------- cot_faithfulness (DiagnosisArena)
COT_FAITH_COMMIT = "d6f8495"  # resolved to the full hash at build time
COT_FAITH_MODELS = {
    # column prefix: (model, family)
    "deepseek_r1": ("DeepSeek-R1-Distill-Llama-8B", "deepseek-r1"),
    "olmo2_7b": ("OLMo-2-1124-7B-Instruct", "olmo"),
}
PER_COT_FAITH_MODEL = {"deepseek_r1": 600, "olmo2_7b": 300}


def _xlsx_rows(data: bytes, sheet: int = 1) -> list[list[str | None]]:
    """The cells of one worksheet of an .xlsx (inline or shared strings), standard library only."""
    import xml.etree.ElementTree as ET

    main_ns = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    ns = {"m": main_ns}
    tag_t = f"{{{main_ns}}}t"
    z = zipfile.ZipFile(io.BytesIO(data))
    shared = []
    if "xl/sharedStrings.xml" in z.namelist():
        for si in ET.fromstring(z.read("xl/sharedStrings.xml")).findall("m:si", ns):
            shared.append("".join(t.text or "" for t in si.iter(tag_t)))

    def col(ref: str) -> int:
        n = 0
        for ch in re.match(r"[A-Z]+", ref).group():
            n = n * 26 + ord(ch) - 64
        return n - 1

    rows = []
    for r in ET.fromstring(z.read(f"xl/worksheets/sheet{sheet}.xml")).iter(f"{{{main_ns}}}row"):
        vals: dict[int, str | None] = {}
        for c in r.findall("m:c", ns):
            v = c.find("m:v", ns)
            if c.get("t") == "inlineStr":
                vals[col(c.get("r"))] = "".join(t.text or "" for t in c.iter(tag_t))
            elif c.get("t") == "s":
                vals[col(c.get("r"))] = shared[int(v.text)]
            else:
                vals[col(c.get("r"))] = v.text if v is not None else None
        if vals:
            rows.append([vals.get(j) for j in range(max(vals) + 1)])
    return rows


def load_cot_faithfulness(mirror: Path) -> list[dict]:
    """DeepSeek-R1-Distill-Llama-8B and OLMo-2-7B-Instruct CoT replies on DiagnosisArena (4 options).

    ``redagavin/cot_faithfulness`` (gender-swap CoT faithfulness study) committed
    ``results/diagnosis_arena_results.xlsx``: per case the prompt (original and gender-swapped
    wording), each model's full reply (``transformers`` ``apply_chat_template``, up to 8192 new
    tokens; the R1 distill's ``<think>`` opener is part of its chat template, so replies hold the
    reasoning, ``</think>``, then the answer) and the authors' parsed answer (first ``\\boxed{X}``,
    else answer/standalone-letter patterns, else "Unclear"). No licence is stated by the repository.
    Its other result files (MedQA, MedXpertQA, DeepSeek-R1-0528-Qwen3-8B) are over the snapshot size
    limit; its BHCS results are MIMIC-derived (credentialed data) and are not used.
    """
    commit = _git(mirror, "rev-parse", COT_FAITH_COMMIT).decode().strip()
    path = "results/diagnosis_arena_results.xlsx"
    table = _xlsx_rows(_git(mirror, "show", f"{commit}:{path}"))
    head, body = table[0], table[1:]
    lic = "none stated upstream (redagavin/cot_faithfulness has no licence file); cases from DiagnosisArena"
    rows: list[dict] = []
    for prefix, (model, family) in COT_FAITH_MODELS.items():
        got = []
        for cells in body:
            e = dict(zip(head, cells, strict=False))
            opts = [[k, str(e[f"option_{k.lower()}"] or "")] for k in "ABCD"]
            for variant in ("female", "male"):
                reply = e.get(f"{prefix}_{variant}_response")
                if reply is None:
                    continue
                pub = e.get(f"{prefix}_{variant}_answer")
                got.append(
                    {
                        "id": f"cotfaith:diagnosis_arena:{model}:{e['id']}:{variant}",
                        "source": f"redagavin/cot_faithfulness@{commit}:{path}",
                        "licence": lic,
                        "model": model,
                        "family": family,
                        "benchmark": "diagnosis_arena",
                        "task_type": "text_mcq",
                        "options": opts,
                        "gold": e["ground_truth"],
                        "reply": reply,
                        "published": pub if pub in ("A", "B", "C", "D") else None,
                        "published_how": "cot_faithfulness extract_diagnosis_answer (first \\boxed{X}, else"
                        " 'answer:' patterns, else a last letter)"
                        + ("" if pub in ("A", "B", "C", "D") else f" gave {pub!r}"),
                    }
                )
        rows += _sample(got, PER_COT_FAITH_MODEL[prefix])
    return rows


# ---------------------------------------------------------------- M-ARC (MedARC-QA)
MARC_COMMIT = "24be787"  # resolved to the full hash at build time
MARC_MODELS = {
    # eval_results/<stem>_health_result.json: (model, family)
    "Qwen_QwQ-32B": ("QwQ-32B", "qwen"),
    "Qwen_Qwen2.5-14B-Instruct": ("Qwen2.5-14B-Instruct", "qwen"),
    "deepseek-ai_DeepSeek-R1": ("DeepSeek-R1 (API, answer only)", "deepseek-r1"),
    "deepseek-ai_DeepSeek-R1-Distill-Qwen-14B": ("DeepSeek-R1-Distill-Qwen-14B", "deepseek-r1"),
    "gpt-4o": ("gpt-4o", "openai-gpt"),
    "gpt-4o-mini": ("gpt-4o-mini", "openai-gpt"),
    "o1-2024-12-17_200000": ("o1-2024-12-17", "openai-gpt"),
    "o1-mini": ("o1-mini", "openai-gpt"),
    "o3-mini": ("o3-mini", "openai-gpt"),
    "claude-3-opus-20240229": ("claude-3-opus", "claude"),
    "claude-3-sonnet-20240229": ("claude-3-sonnet", "claude"),
    "gemini-1.5-flash-latest": ("gemini-1.5-flash", "gemini"),
    "gemini-1.5-pro-latest": ("gemini-1.5-pro", "gemini"),
    "Llama-3.1-8B-Instruct": ("Llama-3.1-8B-Instruct", "llama"),
    "Llama-3.1-70B-Instruct": ("Llama-3.1-70B-Instruct", "llama"),
    "Llama-3.3-70B-Instruct": ("Llama-3.3-70B-Instruct", "llama"),
    "Llama3.1-405b-instruct-fp8": ("Llama-3.1-405B-Instruct-fp8", "llama"),
    "Meditron3-8B": ("Meditron3-8B (Llama-3.1)", "llama"),
    "microsoft_phi-4": ("phi-4", "phi"),
    "OpenMeditron_Meditron3-Phi4-14B": ("Meditron3-Phi4-14B", "phi"),
    "Mistral-7B-Instruct-v0.3": ("Mistral-7B-Instruct-v0.3", "mistral"),
}


def load_medarc_qa(mirror: Path) -> list[dict]:
    """M-ARC (MedARC-QA, 100 adversarial clinical MCQs, up to 10 options): every reply of 22 models.

    ``starmpcc/medARC-QA`` (Apache-2.0) evaluates with MMLU-Pro's harness (5-shot CoT prompt, "The
    answer is (X)") and commits each model's ``eval_results/<model>_health_result.json`` with the
    reply (``model_outputs``) and its ``pred`` (``evaluate_from_api.extract_answer``: first
    ``answer is (X)``, else ``Answer: X``, else ``best course of action ... (X)``). QwQ-32B and the
    R1 distill replies hold their reasoning up to ``</think>`` (the opener is in the chat template);
    the DeepSeek-R1 / o1 / o3-mini APIs return the answer only. ``outputs_2025-02-26_03-03-48`` names
    no model and is left out; so is medalpaca-13b, whose replies are repetition loops cut off at the
    token limit (82 of its 100 replies had no statement a reader could take for an answer).
    """
    commit = _git(mirror, "rev-parse", MARC_COMMIT).decode().strip()
    lic = "Apache-2.0 (starmpcc/medARC-QA LICENSE)"
    rows: list[dict] = []
    for stem, (model, family) in MARC_MODELS.items():
        path = f"eval_results/{stem}_health_result.json"
        src = f"starmpcc/medARC-QA@{commit}:{path}"
        for e in json.loads(_git(mirror, "show", f"{commit}:{path}")):
            row = _mmlu_pro_row(src, lic, model, family, e, e.get("model_outputs") or "")
            row.update(
                id=f"medarc-qa:{model}:{e['question_id']}",
                benchmark="medarc_qa",
                published_how="M-ARC extract_answer (first 'answer is (X)', else 'Answer: X', else 'best course"
                " of action ... (X)')",
            )
            rows.append(row)
    return rows


# ---------------------------------------------------------------- MMMU-Pro (image questions)
MMMU_COMMIT = "6aa5aa3207295bbc4c561b7734d2986afbe227f2"
MMMU_MEDICAL = (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
)


def load_mmmu_pro(mirror: Path) -> list[dict]:
    """GPT-4o on MMMU-Pro's medical subjects: image multiple choice with up to 10 options.

    ``MMMU-Benchmark/MMMU`` (Apache-2.0) committed ``mmmu-pro/output/gpt-4o_{standard,vision}_{cot,direct}.jsonl``
    (the standard files are renamed later; read at MMMU_COMMIT): every reply with the authors' parsed ``pred_indexs``
    (``mmmu-pro/evaluate.py::parse_multi_choice_response``: the text after the last ``Answer:``, else
    option letters or texts found in the reply, else a random option). ``standard``: image(s) plus the
    question in text; ``vision``: the whole question is a screenshot and the CoT prompt asks the model
    to write it out first. Only the five medical subjects are read.
    """
    import ast

    lic = "Apache-2.0 (MMMU-Benchmark/MMMU LICENSE)"
    rows: list[dict] = []
    for setting in ("standard", "vision"):
        for mode in ("cot", "direct"):
            path = f"mmmu-pro/output/gpt-4o_{setting}_{mode}.jsonl"
            src = f"MMMU-Benchmark/MMMU@{MMMU_COMMIT}:{path}"
            for line in _git(mirror, "show", f"{MMMU_COMMIT}:{path}").decode().splitlines():
                if not line.strip():
                    continue
                e = json.loads(line)
                if e.get("subject") not in MMMU_MEDICAL:
                    continue
                opts = ast.literal_eval(e["options"]) if isinstance(e["options"], str) else e["options"]
                reply = e.get("response") or ""
                rows.append(
                    {
                        "id": f"mmmu-pro:gpt-4o:{setting}-{mode}:{e['id']}",
                        "source": src,
                        "licence": lic,
                        "model": f"gpt-4o ({setting}, {mode})",
                        "family": "openai-gpt",
                        "benchmark": "mmmu_pro_medical",
                        "task_type": "mm_mcq",
                        "options": [[LETTERS[i], str(o)] for i, o in enumerate(opts)],
                        "gold": e["answer"],
                        "reply": reply,
                        "published": e.get("pred_indexs") or None,
                        "published_how": "MMMU-Pro parse_multi_choice_response (after the last 'Answer:', else"
                        " letters/option texts in the reply, else a random option"
                        + ("" if "Answer:" in reply else "; this reply has no 'Answer:'")
                        + ")",
                    }
                )
    return rows


# ---------------------------------------------------------------- adjudication
_TAIL_PATTERNS = [
    # (name, regex); group "l" is the label. Run on the last non-empty lines, markdown removed.
    (
        "answer_is",
        r"answer\s+(?:is|would\s+be|should\s+be)\s*:?\s*(?:option\s+)?\(?(?P<l>[A-J])\)?(?=[.\s:,]|$)",
    ),
    ("answer_colon", r"^(?:final\s+|correct\s+)?answer\s*:\s*(?:option\s+)?\(?(?P<l>[A-J])\)?(?=[.\s:,]|$)"),
    ("json_choice", r"\"answer_choice\"\s*:\s*\"\s*(?:option\s+)?(?P<l>[A-J])(?=[.\s:,)\"]|$)"),
    ("is_label_end", r"\bis\s*:?\s*(?:option\s+)?\(?(?P<l>[A-J])\)?\.?$"),
    ("paren_label_end", r"\((?P<l>[A-J])\)\.?$"),
    ("bare", r"^\(?(?P<l>[A-J])\)?(?:[.:]\s.*|\.?)$"),
]
MULTI = "<several>"
_CASE_SENSITIVE = {"bare", "paren_label_end", "is_label_end"}
# A few-shot base model that runs on into the next exemplar ("\n\nQuestion:\n..."): what it says
# after that is another question's answer, so such replies are left out of the corpus.
RUNAWAY = re.compile(r"\n\s*Question:\s*\n")


def _stated_labels(reply: str) -> list[str]:
    """The labels a conservative reading finds in the reply's last stating line (of its last 3)."""
    text = reply.split("</think>")[-1].replace("**", "").replace("__", "")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if (
        len(lines) > 1
        and re.match(r"^\(?[A-J][.)]\s", lines[-2])
        and re.match(r"^\(?[A-J][.)]?(?:\s|$)", lines[-1])
    ):
        return []  # the reply ends inside a list of options ("D. ...\nE"): no statement
    # The last of the last 3 lines that states anything decides; earlier lines are not read.
    for back, ln in enumerate(reversed(lines[-3:])):
        found = []
        for name, pat in _TAIL_PATTERNS:
            if back and name not in ("answer_is", "json_choice"):
                continue
            flags = 0 if name in _CASE_SENSITIVE else re.IGNORECASE
            for m in re.finditer(pat, ln, flags):
                found.append(m.group("l").upper())
                # "The answer is (A, C)", "A and D", "B/C": several labels in one statement.
                if re.match(
                    r"\)?\s*(?:,|\band\b|\bor\b|&|/)\s*(?:option\s+)?\(?[A-J]\)?(?![A-Za-z])",
                    ln[m.end("l") :],
                ):
                    found.append(MULTI)
                if name == "json_choice":  # "B. Amoxicillin-clavulanate or C. Clindamycin", "B. B and C. C"
                    value = ln[m.start("l") :].split('"')[0]
                    if len(set(re.findall(r"(?:^|\s)([A-J])\.(?=\s|$)", value))) > 1:
                        found.append(MULTI)
        if "answer_choice" in ln:  # a JSON block on one line: only its answer_choice states the answer
            found = [f for f in found if f == MULTI] + [
                m.group("l").upper() for m in re.finditer(_TAIL_PATTERNS[2][1], ln, re.IGNORECASE)
            ]
        if found:
            last_sentence = re.split(r"(?<=[.!?])\s+", ln.strip())[-1]
            if "answer_choice" not in ln and len(set(re.findall(r"(?:^|\s)\(([A-J])\)", last_sentence))) > 1:
                found.append(MULTI)  # "is (A) and (E)", "The correct answer is (H). ... The answer is (E)."
            return found
    return []


def _names_several(reply: str) -> bool:
    """Does the last stating line name several labels? Then agreement alone does not decide."""
    stated = _stated_labels(reply)
    return MULTI in stated or len(set(stated)) > 1


def _answer_space(row: dict, label: str | None) -> str | None:
    if label is None or row["task_type"] != "yes_no_maybe":
        return label
    if label.lower() in ("yes", "no", "maybe"):
        return label.lower()
    return dict(row["options"]).get(label)


def _rule_adjudicate(row: dict, extracted: str | None) -> tuple[str, str | None, str] | None:
    """(status, expected, note) when the reply's last lines decide; None when a person must read it."""
    pub = row["published"]
    stated = _stated_labels(row["reply"])
    if MULTI in stated:
        return None  # several labels: a person decides (several answers, a retraction, an aside)
    uniq = sorted(set(stated))
    outside = [s for s in uniq if s not in {k for k, _ in row["options"]}]
    if outside:
        return "ok", None, f"states label {outside[0]}, which is not one of the options"
    if row["task_type"] == "yes_no_maybe":
        uniq = sorted({_answer_space(row, s) for s in uniq} - {None})
    if len(uniq) == 1:
        label = uniq[0]
        if pub is not None and label == pub:
            return "ok", label, f"last lines state {label}, as published"
        if extracted is not None and label == extracted:
            why = "no published label" if pub is None else f"published {pub!r} read an earlier/other spot"
            return "ok", label, f"last lines state {label}; {why}"
    if len(uniq) > 1:
        return None
    # no 'Answer:': MMMU-Pro's parser fell back to a scan of the reply or a random option
    weak = pub is None or any(
        w in row["published_how"] for w in ("last_letter", "none)", "default A", "has no 'Answer:'")
    )
    if len(uniq) == 1 and weak and extracted is None:
        return "ok", uniq[0], f"last line states {uniq[0]}; the published parser found {pub!r}"
    if not uniq and extracted is None and weak:
        return (
            "ok",
            None,
            f"no final answer stated: published {pub!r} is a fallback/none, last lines state none",
        )
    return None


def adjudicate(rows: list[dict], hand: dict[str, dict]) -> tuple[list[dict], Counter]:
    stats: Counter = Counter()
    kept = []
    for row in rows:
        got = extract_answer(row["reply"], row["task_type"], [tuple(o) for o in row["options"]])
        pub = row["published"]
        row["adjudicated"] = False
        if row["id"] in hand and hand[row["id"]].get("exclude"):
            stats["hand_excluded"] += 1
            continue
        if row["id"] in hand:
            h = hand[row["id"]]
            row.update(expected=h["expected"], adjudicated=True, adjudicated_by="hand", note=h["note"])
            stats["hand"] += 1
        elif (
            got.answer is not None
            and pub is not None
            and is_correct(got.answer, pub, row["task_type"])
            and not _names_several(row["reply"])
        ):
            row["expected"] = pub
            stats["agree"] += 1
        elif "<think>" in row["reply"] and "</think>" not in row["reply"]:
            row.update(expected=None, adjudicated=True, adjudicated_by="rule", note="cut off inside <think>")
            stats["rule"] += 1
        else:
            decided = _rule_adjudicate(row, got.answer)
            if decided is None:
                stats["open"] += 1
                row["open"] = True
                row["extracted"] = got.answer
                kept.append(row)
                continue
            _status, expected, note = decided
            row.update(expected=expected, adjudicated=True, adjudicated_by="rule", note=note)
            stats["rule"] += 1
        kept.append(row)
    return kept, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mmlu-pro", type=Path, required=True, help="bare git dir of TIGER-AI-Lab/MMLU-Pro")
    ap.add_argument("--mirage", type=Path, help="bare git dir of Teddy-XiongGZ/MIRAGE")
    ap.add_argument("--medarc", type=Path, required=True, help="bare git dir of MedARC-AI/med-lm-envs")
    ap.add_argument("--flare", type=Path, help="bare git dir of QingxuanKong/FLARE-Med-New")
    ap.add_argument("--cot-faithfulness", type=Path, help="bare git dir of redagavin/cot_faithfulness")
    ap.add_argument("--medarc-qa", type=Path, help="bare git dir of starmpcc/medARC-QA")
    ap.add_argument("--mmmu", type=Path, help="bare git dir of MMMU-Benchmark/MMMU")
    ap.add_argument(
        "--shared-data",
        type=Path,
        default=ROOT.parent / "shared" / "data",
        help="the public benchmark files (MIRAGE question ids are resolved against them)",
    )
    ap.add_argument("--raw-cache", type=Path, help="cache of the rows read from the mirrors (jsonl)")
    ap.add_argument("--open-out", type=Path, help="write rows still to adjudicate by hand here (jsonl)")
    args = ap.parse_args()
    if args.raw_cache and args.raw_cache.exists():  # iterating on adjudication: skip the git reads
        rows = [json.loads(line) for line in args.raw_cache.read_text().splitlines()]
    else:
        rows = load_mmlu_pro(args.mmlu_pro) + load_medarc(args.medarc)
        if args.mirage:
            rows += load_mirage(args.mirage, args.shared_data)
        if args.flare:
            rows += load_flare(args.flare)
        if args.cot_faithfulness:
            rows += load_cot_faithfulness(args.cot_faithfulness)
        if args.medarc_qa:
            rows += load_medarc_qa(args.medarc_qa)
        if args.mmmu:
            rows += load_mmmu_pro(args.mmmu)
        if args.raw_cache:
            args.raw_cache.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hand_path = OUT / "adjudications.jsonl"
    hand = {}
    if hand_path.exists():
        for line in hand_path.read_text().splitlines():
            if line.strip():
                h = json.loads(line)
                hand[h["id"]] = h
    runaway = [r for r in rows if RUNAWAY.search(r["reply"])]
    rows = [r for r in rows if not RUNAWAY.search(r["reply"])]
    rows, stats = adjudicate(rows, hand)
    stats["runaway_left_out"] = len(runaway)
    open_rows = [r for r in rows if r.get("open")]
    if args.open_out:
        with args.open_out.open("w") as f:
            for r in open_rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    rows = [r for r in rows if not r.get("open")]
    OUT.mkdir(parents=True, exist_ok=True)
    for split, fams in (("tests", TEST_FAMILIES), ("heldout", HELDOUT_FAMILIES)):
        part = sorted((r for r in rows if r["family"] in fams), key=lambda r: r["id"])
        unknown = {r["family"] for r in rows} - TEST_FAMILIES - HELDOUT_FAMILIES
        if unknown:
            raise SystemExit(f"families in neither split: {sorted(unknown)}")
        # mtime=0: the same input gives the same bytes.
        with gzip.GzipFile(OUT / f"{split}.jsonl.gz", "wb", mtime=0) as f:
            for r in part:
                f.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode())
        print(f"{split}: {len(part)} rows, families {dict(Counter(r['family'] for r in part))}")
    print(f"adjudication: {dict(stats)}; left out (open): {len(open_rows)}")


if __name__ == "__main__":
    main()
