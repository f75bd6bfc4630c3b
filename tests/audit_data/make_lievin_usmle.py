"""Rebuild ``lievin_usmle_valid.jsonl.gz`` from the public CoT showcase of Liévin et al.

Source: github.com/vlievin/medical-reasoning @ bb0e7f6934c455797f46837395c25e6af2be3c0b,
``docs/samples/usmle-valid.html`` (Apache-2.0): 100 MedQA-USMLE *validation* questions, each
answered by InstructGPT (code-davinci-002) under 30 prompts (1 direct + 29 chain-of-thought),
each reply marked correct or not by the authors. Kept per reply: the authors' mark and the last
``TAIL`` characters (the final-answer statement); the reasoning before it is dropped for size.

    git -C MIRROR show HEAD:docs/samples/usmle-valid.html > usmle-valid.html
    python tests/audit_data/make_lievin_usmle.py usmle-valid.html tests/audit_data/lievin_usmle_valid.jsonl.gz
"""

from __future__ import annotations

import gzip
import html
import json
import re
import sys

TAIL = 240
ROW = re.compile(r"<tr data-qid=(\w+)>(.*?)</tr>", re.S)
CELL = re.compile(r"<td[^>]*>(.*?)</td>", re.S)
OPTION = re.compile(r"^(?:<strong>)?([A-Z])\) (.*?)(?:</strong>)?$")


def main(src: str, dst: str) -> None:
    text = open(src, encoding="utf-8").read()
    headers = [html.unescape(h).strip() for h in re.findall(r"<th>(.*?)</th>", text, re.S)]
    questions: dict[str, dict] = {}
    for qid, body in ROW.findall(text):
        cells = CELL.findall(body)
        if len(cells) == 1:  # the question row: id, stem, options (the gold in <strong>)
            cell = cells[0]
            ident = re.search(r"\[(validation:\d+)\]", cell).group(1)
            stem, _, opts = html.unescape(cell).partition("\n\n")
            options, gold = {}, None
            for line in opts.strip().splitlines():
                m = OPTION.match(line.strip())
                if m:
                    options[m.group(1)] = m.group(2)
                    if line.strip().startswith("<strong>"):
                        gold = m.group(1)
            stem = re.sub(r"^<strong>[^<]*</strong>\s*Q:\s*", "", stem).strip()
            questions[qid] = {
                "id": ident,
                "question": stem,
                "options": options,
                "answer_idx": gold,
                "replies": [],
            }
        else:
            for i, cell in enumerate(cells):
                reply = html.unescape(cell).strip()
                mark = reply[:1]
                questions[qid]["replies"].append(
                    {
                        "prompt": headers[i] if i < len(headers) else str(i),
                        "correct": mark == "\u2705",
                        "tail": reply[1:].strip()[-TAIL:],
                    }
                )
    skipped = [q["id"] for q in questions.values() if not q["answer_idx"]]  # no option marked as gold
    with gzip.open(dst, "wt", encoding="utf-8") as fh:
        for q in questions.values():
            if q["answer_idx"]:
                assert len(q["options"]) == 4 and len(q["replies"]) == 30, q["id"]
                fh.write(json.dumps(q, ensure_ascii=False) + "\n")
    print(f"{len(questions) - len(skipped)} questions written; without a marked gold: {skipped}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
