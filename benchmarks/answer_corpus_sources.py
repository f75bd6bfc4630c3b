"""Readers of the third-party answer corpus: MMLU-Pro, MIRAGE, FLARE, MedARC and M-ARC.

Each ``load_*`` reads one fetched git mirror (a bare git directory) and returns the corpus rows
of that source, before adjudication; ``build_answer_corpus.py`` (the builder and its command
line) documents the sources and writes the corpus. The DiagnosisArena and MMMU-Pro readers are in
``answer_corpus_more_sources.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import zipfile
from pathlib import Path

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

PER_ZIP_MODEL = 120  # sampled replies per 5-shot model (818 health questions each)
PER_RESULT_MODEL = 400  # sampled replies per 0-shot result file (gpt-4o, deepseek, minimax)
PER_MIRAGE_RUN = 110  # per (benchmark, cot|rag, model)
PER_MEDARC = 150


def git(mirror: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(mirror), *args], check=True, capture_output=True).stdout


def _head(mirror: Path) -> str:
    return git(mirror, "rev-parse", "HEAD").decode().strip()


def _key(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


def sample(rows: list[dict], n: int) -> list[dict]:
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


def mmlu_pro_row(src: str, lic: str, model: str, family: str, e: dict, text: str) -> dict:
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
        data = git(mirror, "show", f"{head}:{path}")
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            (name,) = [n for n in z.namelist() if n.endswith(".json")]
            entries = json.loads(z.read(name))
        if isinstance(entries, dict):  # some runs store {category: [entries]}
            entries = [e for v in entries.values() if isinstance(v, list) for e in v]
        src = f"TIGER-AI-Lab/MMLU-Pro@{head}:{path}"
        got = [
            mmlu_pro_row(src, lic, stem, family, e, e.get("generated_text") or e.get("model_outputs") or "")
            for e in entries
            if isinstance(e, dict) and e.get("category") == "health"  # DeepSeek-Coder-V2 has stray strings
        ]
        rows += sample(got, PER_ZIP_MODEL)
    for folder, (commit, family, model) in MMLU_PRO_RESULTS.items():
        path = f"eval_results/{folder}/health_result.json"
        entries = json.loads(git(mirror, "show", f"{commit}:{path}"))
        src = f"TIGER-AI-Lab/MMLU-Pro@{commit}:{path}"
        got = [
            mmlu_pro_row(src, lic, model, family, e, e.get("response") or e.get("model_outputs") or "")
            for e in entries
        ]
        rows += sample(got, PER_RESULT_MODEL)
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
    names = git(mirror, "ls-tree", "-r", "--name-only", head, "prediction").decode().splitlines()
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
            replies = json.loads(git(mirror, "show", f"{head}:{p}"))
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
        git(mirror, "ls-tree", "-r", "--name-only", FLARE_COMMIT, "MIRAGE/prediction").decode().splitlines()
    )
    rows: list[dict] = []
    for ds in ("medqa", "mmlu"):
        prefix = f"MIRAGE/prediction/{ds}/rag_32/meta-llama/Llama-3.2-3B-Instruct/"
        paths = sorted((n for n in names if n.startswith(prefix)), key=_key)[: PER_MIRAGE_RUN * 2]
        for p in sorted(paths):
            e = json.loads(git(mirror, "show", f"{FLARE_COMMIT}:{p}"))
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
    resolved = git(mirror, "rev-parse", commit).decode().strip()
    lic = "MIT (MedARC-AI/med-lm-envs LICENSE)"
    base = "outputs/evals/metamedqa--mistral-small-latest"
    names = git(mirror, "ls-tree", "-r", "--name-only", resolved, base).decode().splitlines()
    rows: list[dict] = []
    for p in sorted(n for n in names if n.endswith("results.jsonl")):
        run = p.split("/")[-2]
        for line in git(mirror, "show", f"{resolved}:{p}").decode().splitlines():
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
    return sample(rows, PER_MEDARC)


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
    commit = git(mirror, "rev-parse", MARC_COMMIT).decode().strip()
    lic = "Apache-2.0 (starmpcc/medARC-QA LICENSE)"
    rows: list[dict] = []
    for stem, (model, family) in MARC_MODELS.items():
        path = f"eval_results/{stem}_health_result.json"
        src = f"starmpcc/medARC-QA@{commit}:{path}"
        for e in json.loads(git(mirror, "show", f"{commit}:{path}")):
            row = mmlu_pro_row(src, lic, model, family, e, e.get("model_outputs") or "")
            row.update(
                id=f"medarc-qa:{model}:{e['question_id']}",
                benchmark="medarc_qa",
                published_how="M-ARC extract_answer (first 'answer is (X)', else 'Answer: X', else 'best course"
                " of action ... (X)')",
            )
            rows.append(row)
    return rows
