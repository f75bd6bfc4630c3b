"""Talking to the sandbox teacher over plain HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

PROMPT = [
    {"role": "system", "content": "Reason, then 'Final answer: \\boxed{X}'."},
    {"role": "user", "content": "Question:\nWhich drug?\n\nOptions:\nA. Metformin\nB. Insulin\nC. Glipizide"},
]


OPTIONS = [("A", "Metformin"), ("B", "Insulin"), ("C", "Glipizide")]


def post(base_url: str, body: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(
        base_url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            try:
                return resp.status, json.loads(raw), dict(resp.headers)
            except ValueError:
                return resp.status, {"_malformed": raw.decode()}, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)
