"""Batch mode for distillation: ``--estimate``'s projection of what batch-mode teachers will batch.

The Batch backend itself (submit, resume, poll, collect, split requests whose ``n`` was ignored)
is the request processor's (:mod:`octomed_data.inference.batch_run`, records in
:mod:`octomed_data.inference.batch_records`); the engine's side of it is
:class:`~octomed_data.distill.engine.DistillBatches`.
"""

from __future__ import annotations

from typing import Any

from octomed_data.inference.batch_records import (
    COLLECTED,
    N_HONOURED,
    N_IGNORED,
    SUBMITTED,
    SUBMITTING,
    batch_dir,
    batch_n_support,
    n_support_uri,
    read_records,
)
from octomed_data.teachers import DistillConfig

__all__ = [
    "COLLECTED",
    "N_HONOURED",
    "N_IGNORED",
    "SUBMITTED",
    "SUBMITTING",
    "batch_dir",
    "batch_estimate",
    "batch_n_support",
    "n_support_uri",
    "read_records",
]


def batch_estimate(result: dict[str, Any], config: DistillConfig, out: str | None) -> dict[str, Any]:
    """``--estimate``'s projection (:func:`octomed_data.distill.run.estimate`) with the requests
    batch-mode teachers will really batch, and what batching saves; ``result`` is updated.

    A teacher whose batches are known to honour ``n`` (:func:`batch_n_support` in ``out``) sends
    one request per question; one known to ignore ``n``, or whose ``n`` support in batches is
    unknown, is projected with one request per sample (what the run sends once it has seen ``n``
    ignored: the samples are batched, split). Every sample of a batch-mode teacher is projected
    at the batch price (``batch_share`` 1.0); ``saving`` is 1 - cost / the same tokens online.
    """
    total = online_total = 0.0
    for name, proj in result["teachers"].items():
        t = config.teacher(name)
        m = proj.get("measured")
        if not m:
            continue
        if t.mode == "batch":
            known = batch_n_support(out, t)
            if t.supports_n is False:
                split, note = True, "supports_n is false: one batch request per sample"
            elif known == N_HONOURED:
                split, note = False, "its batches honour n (seen in this output): one request per question"
            elif known == N_IGNORED:
                split, note = True, "its batches ignore n (seen in this output): one batch request per sample"
            else:
                split = True
                note = (
                    "n support in its batches unknown: estimated with one batch request per sample "
                    "(what the run sends if the first batch shows n ignored; fewer prompt tokens if n "
                    "is honoured)"
                )
            requests = proj["samples"] if split else proj["questions"]
            prompt_tokens = int(m["prompt_tokens_per_request"] * requests)
            proj.update(
                requests=requests,
                prompt_tokens=prompt_tokens,
                batch_n=known or "unknown",
                batch_requests="one per sample" if split else "one per question (n)",
                batch_note=note,
            )
        usd = t.cost_usd(proj["prompt_tokens"], proj["completion_tokens"], batch=t.mode == "batch")
        online = t.cost_usd(proj["prompt_tokens"], proj["completion_tokens"])
        proj.update(
            cost_usd=round(usd, 2),
            online_cost_usd=round(online, 2),
            batch_share=1.0 if t.mode == "batch" else 0.0,
            saving=round(1 - usd / online, 4) if online else 0.0,
        )
        total += usd
        online_total += online
    result["total_cost_usd"] = round(total, 2)
    result["total_online_cost_usd"] = round(online_total, 2)
    result["saving"] = round(1 - total / online_total, 4) if online_total else 0.0
    return result
