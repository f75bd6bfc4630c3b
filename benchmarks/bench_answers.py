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

``--third-party`` measures THE extractor on real replies of many model families with the label each
reply states (``tests/answer_corpus/third_party/``, see its ``SOURCES.md``): per split (``tests``: the
families the test suite sees; ``heldout``: families only this benchmark reads), per family, per
benchmark and per final-answer *form* (:func:`answer_form`, a small heuristic on the reply's end):
agreement with ``expected``, read rate (read as stated, among replies that state an answer), unread,
misreads (another answer than the stated one) and false accepts (an answer where the reply states
none). ``--failures PATH`` also writes the failing replies grouped by form, with verbatim tails.

    .venv/bin/python benchmarks/bench_answers.py
    .venv/bin/python benchmarks/bench_answers.py --real-html usmle-valid.html pubmedqa.html
    .venv/bin/python benchmarks/bench_answers.py --third-party --failures /tmp/notes/corpus_failures.md
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import re
import sys
import time
from collections import Counter, defaultdict
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


_LABEL = r"\(?[A-J]\)?"
_FORMS: list[tuple[str, re.Pattern]] = [
    ("boxed", re.compile(r"\\boxed\s*\{")),
    ("answer tag", re.compile(r"<answer>", re.IGNORECASE)),
    (
        "json block",
        re.compile(r"answer(?:_choice)?\"\s*:", re.IGNORECASE),
    ),  # also malformed: answer_choice": "D"
]
_HEADING = re.compile(r"^(?:#+\s*(?:final\s+)?answer\b[^:]*|\*\*(?:final\s+)?answer\*\*)$", re.IGNORECASE)


def answer_form(reply: str) -> str:
    """The form of a reply's final answer, by a small heuristic on its end (for reporting only)."""
    if "<think>" in reply.lower() and "</think>" not in reply.lower():
        return "cut inside <think>"
    text = reply.split("</think>")[-1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "empty"
    tail = "\n".join(lines[-4:])
    for name, pat in _FORMS:
        if pat.search(tail):
            return name
    plain = [ln.replace("**", "").replace("__", "").strip() for ln in lines]
    last = plain[-1]
    before = plain[-2] if len(plain) > 1 else ""
    if len(lines) <= 2 and len(text) < 120:
        return "bare (short reply)"
    if len(lines) > 1 and _HEADING.match(lines[-2]):
        return "heading without colon (### Answer)"
    label_line = re.match(rf"^{_LABEL}(?:[.:)]\s|[.:)]?$)", last)
    if re.search(r"\banswer\s+(?:is|would be|should be)\b", "\n".join(plain[-3:]), re.IGNORECASE):
        if re.search(r"(?:is|be)\s*:?\s*$", before, re.IGNORECASE) and label_line:
            return "lead-in 'is:' + label on its own line"
        return "'answer is X'"
    if re.match(r"^(?:final\s+|correct\s+)?answer\s*:", last, re.IGNORECASE):
        return "'Answer: X' line"
    if re.search(r":\s*$", before) and label_line:
        return "lead-in ':' + label on its own line"
    if label_line:
        return "lone label last line"
    if re.search(r"\[[A-J]\]", last):
        return "bracketed [X]"
    if re.search(r"\*\*[^*]{0,80}\*\*", "\n".join(lines[-3:])):
        return "bold elsewhere"
    if re.search(rf"(?:\bis|\bbe)\s*:?\s*(?:option\s+)?{_LABEL}[.\s]*$|\([A-J]\)\.?$", last):
        return "prose ending '... is (X)' / '(X).'"
    if re.search(r"\b(?:option|choice)\s+\(?[A-J]\)?\b", "\n".join(plain[-3:]), re.IGNORECASE):
        return "'option X' in prose"
    return "other / none stated"


def third_party_measure(rows: list[dict]) -> tuple[dict, dict]:
    """Counts per (axis, value) and the failing rows by kind (unread, misread, false_accept)."""
    per: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    failures: dict[str, list[tuple[dict, str | None]]] = defaultdict(list)
    for row in rows:
        got = extract_answer(row["reply"], row["task_type"], [tuple(o) for o in row["options"]])
        exp = row["expected"]
        form = answer_form(row["reply"])
        if exp is None:
            kind = "false_accept" if got.answer is not None else "agree"
        elif got.answer is None:
            kind = "unread"
        elif is_correct(got.answer, exp, row["task_type"]):
            kind = "agree"
        else:
            kind = "misread"
        if kind != "agree":
            failures[kind].append((row | {"form": form}, got.answer))
        for key in (
            ("ALL", "ALL"),
            ("family", row["family"]),
            ("benchmark", row["benchmark"]),
            ("form", form),
        ):
            c = per[key]
            c["n"] += 1
            c["stated"] += exp is not None
            c["agree"] += kind == "agree"
            c["read_ok"] += kind == "agree" and exp is not None
            if kind != "agree":
                c[kind] += 1
    return {k: dict(v) for k, v in per.items()}, failures


def third_party_table(split: str, per: dict) -> str:
    lines = [
        f"\n### split `{split}`\n",
        "| axis | value | replies | state an answer | agreement | read rate | unread | misread | false accepts |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"ALL": 0, "family": 1, "benchmark": 2, "form": 3}
    for axis, value in sorted(per, key=lambda k: (order[k[0]], -per[k]["n"], k[1])):
        c = per[(axis, value)]
        n, stated = c["n"], c.get("stated", 0)
        rate = f"{c.get('read_ok', 0) / stated:.3f}" if stated else "–"
        name = f"**{value}**" if axis == "ALL" else value
        lines.append(
            f"| {axis} | {name} | {n} | {stated} | {c.get('agree', 0) / n:.3f} | {rate} | {c.get('unread', 0)} "
            f"| {c.get('misread', 0)} | {c.get('false_accept', 0)} |"
        )
    return "\n".join(lines)


def _tail(text: str, n: int = 300) -> str:
    text = text.strip()
    return ("…" + text[-n:]) if len(text) > n else text


def failures_markdown(by_split: dict[str, dict]) -> str:
    """The failing replies grouped by split, kind and form, with up to 3 short verbatim tails each."""
    out = [
        "# Answer extractor failures on real replies (third-party corpus)",
        "",
        "Generated by `benchmarks/bench_answers.py --third-party --failures PATH`. Data: "
        "`tests/answer_corpus/third_party/{tests,heldout}.jsonl.gz` (load with "
        "`tests/answer_corpus/third_party.py::rows(split)`), provenance in `third_party/SOURCES.md`.",
        "Each example: row id, what the reply states (`expected`), what THE extractor read, and the "
        "reply's last ~300 characters verbatim.",
    ]
    fence = "~~~"
    for split, failures in by_split.items():
        for kind in ("misread", "false_accept", "unread"):
            items = failures.get(kind, [])
            out.append(f"\n## `{split}` split: {kind} ({len(items)} replies)\n")
            by_form: dict[str, list] = defaultdict(list)
            for row, got in items:
                by_form[row["form"]].append((row, got))
            for form, group in sorted(by_form.items(), key=lambda kv: -len(kv[1])):
                fams = ", ".join(f"{f} {n}" for f, n in Counter(r["family"] for r, _ in group).most_common())
                out.append(f"### {form}: {len(group)} ({fams})\n")
                step = max(1, len(group) // 3)
                for row, got in group[::step][:3]:
                    note = f" (note: {row['note']})" if row.get("note") else ""
                    body = _tail(row["reply"]).replace(fence, "~ ~ ~")
                    out.append(
                        f"- `{row['id']}` expected `{row['expected']}`, read `{got}`{note}\n\n"
                        f"{fence}text\n{body}\n{fence}\n"
                    )
    return "\n".join(out) + "\n"


def run_third_party(failures_path: Path | None, json_path: Path | None) -> None:
    path = ROOT / "tests" / "answer_corpus" / "third_party.py"
    spec = importlib.util.spec_from_file_location("third_party_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    by_split, numbers = {}, {}
    print("## THE extractor on real third-party replies")
    for split in module.SPLITS:
        rows = module.rows(split)
        started = time.perf_counter()
        per, failures = third_party_measure(rows)
        elapsed = time.perf_counter() - started
        print(third_party_table(split, per))
        print(f"\n{len(rows)} replies, {elapsed * 1000 / max(len(rows), 1):.3f} ms per reply")
        by_split[split] = failures
        numbers[split] = {f"{a}:{v}": c for (a, v), c in per.items()}
    if failures_path:
        failures_path.write_text(failures_markdown(by_split))
    if json_path:
        json_path.write_text(json.dumps(numbers, indent=2, sort_keys=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the per-form counts here")
    ap.add_argument(
        "--real-html", type=Path, nargs="*", default=[], help="published sample pages (see above)"
    )
    ap.add_argument(
        "--third-party", action="store_true", help="measure on tests/answer_corpus/third_party (both splits)"
    )
    ap.add_argument(
        "--failures", type=Path, help="with --third-party: write the failing replies here (markdown)"
    )
    args = ap.parse_args()
    if args.third_party:
        run_third_party(args.failures, args.json)
        return
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
