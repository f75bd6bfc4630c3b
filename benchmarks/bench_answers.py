"""Report THE answer extractor's behaviour per reply form on the regression corpus (issue 13).

For each form of ``tests/answer_corpus/corpus.py`` (written-for-the-purpose replies, not model
traces): how many replies are read (an answer returned), rejected as a hedge / ambiguous, or
unparsed (no answer, unfinished thought), and how many agree with the recorded expectation.
A false accept (an answer where a rejection is expected, or another answer) is counted apart.
Prints a markdown table; ``--json`` writes the numbers too.

    .venv/bin/python benchmarks/bench_answers.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from octomed_data.answers import AMBIGUOUS, extract_answer  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the per-form counts here")
    args = ap.parse_args()
    rows = load_rows()
    started = time.perf_counter()
    per = measure(rows)
    elapsed = time.perf_counter() - started
    print(table(per))
    print(f"\n{len(rows)} replies, {elapsed * 1000 / len(rows):.3f} ms per reply")
    if args.json:
        args.json.write_text(json.dumps(per, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
