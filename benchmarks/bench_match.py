"""Per-class table of ``verify: normalized`` on the labelled answer pairs, before and after a change.

Reads ``tests/verify/match_pairs/*.jsonl`` (sources in its ``SOURCES.md``) and runs two versions of
:func:`octomed_data.verify.match.equivalent` over every pair (both orders; a pair counts as accepted
when the reference-first call accepts it): the one in the working tree (*after*) and the one at a
git revision (*before*, default ``1db01e5``, the version the issue measured), loaded from
``git show REV:octomed_data/verify/match.py`` (plus its sibling modules at that revision, if any).
For a paraphrase class (``equivalent: true``) the table shows how many pairs were accepted (recall);
for a look-alike class (``false``), how many were accepted (false accepts, which must be 0). Also
prints the rules that accepted pairs after, and the time per call.

    .venv/bin/python benchmarks/bench_match.py
    .venv/bin/python benchmarks/bench_match.py --before HEAD~3 --misses
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAIRS = ROOT / "tests" / "verify" / "match_pairs"
Equivalent = Callable[[str, str], "str | None"]


def load_pairs() -> list[dict]:
    rows: list[dict] = []
    for path in sorted(PAIRS.glob("*.jsonl")):
        rows += [
            json.loads(line) | {"file": path.name} for line in path.read_text().splitlines() if line.strip()
        ]
    return rows


def matcher_at(rev: str) -> Equivalent:
    """``equivalent`` of ``octomed_data/verify/match.py`` at git revision ``rev``, as a throwaway package."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_match_"))
    pkg = tmp / "octomed_before" / "verify"
    pkg.mkdir(parents=True)
    (tmp / "octomed_before" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    names = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", rev, "octomed_data/verify/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in names:
        blob = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{name}"], check=True, capture_output=True
        ).stdout
        target = pkg / Path(name).relative_to("octomed_data/verify")
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("__init__.py"):
            continue  # the package's __init__ would import the judge, settings ...: not the matcher's
        if name.endswith(".py"):
            # the sibling modules of that revision, not today's
            blob = blob.replace(b"from octomed_data.verify.", b"from octomed_before.verify.")
        target.write_bytes(blob)
    sys.path.insert(0, str(tmp))
    spec = importlib.util.spec_from_file_location("octomed_before.verify.match", pkg / "match.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["octomed_before.verify.match"] = module
    spec.loader.exec_module(module)
    return module.equivalent


def measure(fn: Equivalent, rows: list[dict]) -> tuple[list[str | None], float]:
    t0 = time.perf_counter()
    out = [fn(r["reference"], r["candidate"]) for r in rows]
    return out, (time.perf_counter() - t0) / max(len(rows), 1)


def table(rows: list[dict], before: list[str | None], after: list[str | None]) -> str:
    stats: dict[tuple[bool, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for r, b, a in zip(rows, before, after, strict=True):
        s = stats[(r["equivalent"], r["class"])]
        s[0] += 1
        s[1] += b is not None
        s[2] += a is not None
    lines = [
        "| kind | class | pairs | accepted before | accepted after | recall / false accepts before | after |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(kind: str, cls: str, n: int, kb: int, ka: int, equivalent: bool) -> str:
        if equivalent:
            return f"| {kind} | {cls} | {n} | {kb} | {ka} | recall {kb / n:.2f} | recall {ka / n:.2f} |"
        return f"| {kind} | {cls} | {n} | {kb} | {ka} | {kb} false accepts | **{ka}** false accepts |"

    for equivalent, kind in ((True, "paraphrase"), (False, "look-alike")):
        tot = [0, 0, 0]
        for (eq, cls), (n, kb, ka) in sorted(stats.items(), key=lambda kv: (-kv[1][0], kv[0][1])):
            if eq is equivalent:
                lines.append(row(kind, cls, n, kb, ka, equivalent))
                tot = [tot[0] + n, tot[1] + kb, tot[2] + ka]
        lines.append(row(f"**all {kind}s**", "", *tot, equivalent))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--before", default="1db01e5", help="git revision of the matcher to compare with")
    ap.add_argument(
        "--misses", action="store_true", help="also list the pairs the current matcher gets wrong"
    )
    args = ap.parse_args(argv)

    from octomed_data.verify.match import SYNONYMS_VERSION, equivalent

    rows = load_pairs()
    old = matcher_at(args.before)
    before, t_before = measure(old, rows)
    after, t_after = measure(equivalent, rows)
    after_rev, _ = measure(lambda a, b: equivalent(b, a), rows)
    asym = sum((x is None) != (y is None) for x, y in zip(after, after_rev, strict=True))
    files = Counter(r["file"] for r in rows)
    print(f"pairs: {len(rows)} ({', '.join(f'{f}: {n}' for f, n in sorted(files.items()))})")
    print(f"before: git {args.before}; after: working tree ({SYNONYMS_VERSION})\n")
    print(table(rows, before, after))
    rules = Counter(a for r, a in zip(rows, after, strict=True) if a is not None and r["equivalent"])
    print(f"\nrules that accepted paraphrases after: {dict(rules.most_common())}")
    print(f"asymmetric verdicts after (reference/candidate swapped): {asym}")
    print(
        f"time per call: before {t_before * 1e6:.0f} us, after {t_after * 1e6:.0f} us (first calls, cold cache)"
    )
    if args.misses:
        print("\nwrong after:")
        for r, a in zip(rows, after, strict=True):
            if (a is not None) != r["equivalent"]:
                print(
                    f"  [{r['class']}] {r['reference']!r} vs {r['candidate']!r}: expected {r['equivalent']}, got {a}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
