"""Report THE answer extractor's behaviour per reply form on the regression corpus (issue 13).

For each form of ``tests/answer_corpus/corpus.py`` (written-for-the-purpose replies, not model
traces): how many replies are read (an answer returned), rejected as a hedge / ambiguous, or
unparsed (no answer, unfinished thought), and how many agree with the recorded expectation.
A false accept (an answer where a rejection is expected, or another answer) is counted apart.
Prints a markdown table; ``--json`` writes the numbers too.

``--real-html`` also measures agreement with real, published marks: the chain-of-thought sample
pages of Liévin et al., "Can large language models reason about medical questions?"
(github.com/vlievin/medical-reasoning, ``docs/samples/*.html``: InstructGPT replies, each marked
correct or incorrect by the authors). A reply agrees when (extracted == gold) equals its mark.

    .venv/bin/python benchmarks/bench_answers.py
    .venv/bin/python benchmarks/bench_answers.py --real-html usmle-valid.html pubmedqa.html
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from octomed_data.answers import AMBIGUOUS, extract_answer, is_correct  # noqa: E402

_ROW = re.compile(r"<tr data-qid=(\w+)>(.*?)</tr>", re.DOTALL)
_CELL = re.compile(r"<td[^>]*>(.*?)</td>", re.DOTALL)
_OPTION = re.compile(r"^(?:<strong>)?([A-Z])\) (.*?)(?:</strong>)?$", re.MULTILINE)
_MARK = {"\u2705": True, "\u274c": False}


def load_rows() -> list[dict]:
    path = ROOT / "tests" / "answer_corpus" / "corpus.py"
    spec = importlib.util.spec_from_file_location("answer_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ROWS


def measure(rows: list[dict]) -> dict[str, dict[str, int]]:
    per: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        got = extract_answer(row["reply"], row["task_type"], [tuple(o) for o in row["options"]])
        for key in (row["form"], "ALL"):
            c = per[key]
            c["n"] += 1
            if got.answer is not None:
                c["read"] += 1
            elif got.reason == AMBIGUOUS:
                c["hedge_ambiguous"] += 1
            else:
                c["unparsed"] += 1
            c["expected_read"] += row["expected_answer"] is not None
            ok = got.answer == row["expected_answer"] and (
                got.answer is not None or got.reason == row["expected_reason"]
            )
            c["agree"] += ok
            c["false_accept"] += got.answer is not None and got.answer != row["expected_answer"]
    return {k: dict(v) for k, v in per.items()}


def table(per: dict[str, dict[str, int]]) -> str:
    head = (
        "| form | replies | expected read | read | rejected: hedge / ambiguous | unparsed "
        "| agrees with expectation | false accepts |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for form in sorted(per, key=lambda f: (f == "ALL", f)):
        c = per[form]
        n = c["n"]

        def pct(k: str, c: dict[str, int] = c, n: int = n) -> str:
            return f"{c.get(k, 0)} ({100 * c.get(k, 0) / n:.0f}%)"

        name = f"**{form}**" if form == "ALL" else form
        lines.append(
            f"| {name} | {n} | {c.get('expected_read', 0)} | {pct('read')} | {pct('hedge_ambiguous')} "
            f"| {pct('unparsed')} | {c.get('agree', 0)}/{n} | {c.get('false_accept', 0)} |"
        )
    return "\n".join(lines)


def real_agreement(path: Path) -> dict[str, int]:
    """Agreement of THE extractor with the published correct/incorrect marks of one sample page."""
    counts = {"replies": 0, "agree": 0, "unparsed": 0, "false_accept": 0, "marked_correct": 0, "read": 0}
    question: tuple[list[tuple[str, str]], str] | None = None
    for _qid, body in _ROW.findall(path.read_text(encoding="utf-8")):
        cells = _CELL.findall(body)
        if len(cells) == 1 and "colspan" in body:
            opts = [
                (k, html.unescape(re.sub(r"<[^>]+>", "", v)).strip()) for k, v in _OPTION.findall(cells[0])
            ]
            gold = re.search(r"<strong>([A-Z])\)", cells[0])
            question = (opts, gold.group(1)) if gold else None
            continue
        if question is None:
            continue
        opts, gold = question
        ynm = [v.lower() for _, v in opts] == ["yes", "no", "maybe"]
        task = "yes_no_maybe" if ynm else "text_mcq"
        gold_answer = dict(opts)[gold].lower() if ynm else gold
        for cell in cells:
            text = html.unescape(cell).strip()
            if not text or text[0] not in _MARK:
                continue
            mark, reply = _MARK[text[0]], text[1:].strip()
            got = extract_answer(reply, task, opts)
            ok = is_correct(got.answer, gold_answer, task)
            counts["replies"] += 1
            counts["marked_correct"] += mark
            counts["read"] += got.answer is not None
            counts["unparsed"] += got.answer is None
            counts["agree"] += ok == mark
            counts["false_accept"] += ok and not mark
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the per-form counts here")
    ap.add_argument(
        "--real-html", type=Path, nargs="*", default=[], help="published sample pages (see above)"
    )
    args = ap.parse_args()
    rows = load_rows()
    started = time.perf_counter()
    per = measure(rows)
    elapsed = time.perf_counter() - started
    print(table(per))
    print(f"\n{len(rows)} replies, {elapsed * 1000 / len(rows):.3f} ms per reply")
    if args.real_html:
        print(
            "\n| sample page | replies | marked correct | read | unparsed | agree with the mark "
            "| accepted but marked incorrect |\n|---|---|---|---|---|---|---|"
        )
        for path in args.real_html:
            c = real_agreement(path)
            n = max(c["replies"], 1)
            print(
                f"| {path.name} | {c['replies']} | {c['marked_correct']} | {c['read']} | {c['unparsed']} "
                f"| {c['agree']} ({100 * c['agree'] / n:.1f}%) | {c['false_accept']} |"
            )
            per[f"real:{path.name}"] = c
    if args.json:
        args.json.write_text(json.dumps(per, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
