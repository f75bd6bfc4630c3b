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
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from answer_corpus_more_sources import load_cot_faithfulness, load_mmmu_pro  # noqa: E402  (benchmarks/ is on sys.path)
from answer_corpus_sources import (  # noqa: E402
    load_flare,
    load_medarc,
    load_medarc_qa,
    load_mirage,
    load_mmlu_pro,
)

from octomed_data.answers import extract_answer, is_correct  # noqa: E402

OUT = ROOT / "tests" / "answer_corpus" / "third_party"

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
