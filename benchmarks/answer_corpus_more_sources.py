"""Readers of the third-party answer corpus: cot_faithfulness (DiagnosisArena) and MMMU-Pro.

The other readers and the shared git helpers are in ``answer_corpus_sources.py``; the builder and
its command line in ``build_answer_corpus.py``.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

from answer_corpus_sources import LETTERS, git, sample

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
    commit = git(mirror, "rev-parse", COT_FAITH_COMMIT).decode().strip()
    path = "results/diagnosis_arena_results.xlsx"
    table = _xlsx_rows(git(mirror, "show", f"{commit}:{path}"))
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
        rows += sample(got, PER_COT_FAITH_MODEL[prefix])
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
            for line in git(mirror, "show", f"{MMMU_COMMIT}:{path}").decode().splitlines():
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
