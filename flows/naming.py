"""A flow run's run id, and flow runs named and tagged after it.

**Retry resumes.** A flow started without a ``run_id`` (the nightly factory, the UI's Run button
with an empty field, ``octomed-data run`` without ``--run-id``) gets a run id DERIVED from its flow
run, not a random one: ``<recipe name>-<flow run created, UTC, %Y%m%dT%H%M%S>-<flow run id, first 8
hex>`` (:func:`flow_run_run_id`). Both inputs are fixed when Prefect creates the flow run and never
change afterwards, so the UI's Retry of a FAILED run (the same flow run, set back to
``AwaitingRetry``) derives the same run id, finds its ``run.json`` and resumes it: every committed
shard and global step is answered from its marker, nothing is redone. Nothing has to be stored on
the flow run for this (no tag or state to read back, no race with a retry that starts before a
write lands), and the id stays readable (recipe, time) like the ids :func:`octomed_data.runs.new_run_id`
mints outside a flow. A NEW flow run (Run again, a custom run, a schedule) is a new run; a custom
run with ``run_id`` set continues that run, as before.

**Names.** :func:`label_flow_run` renames the current flow run to its run id and adds the tag
``run:<run id>`` once :func:`flows.common.prepare` knows the id (a random name such as
``just-zebra`` said nothing), so the runs list reads by run and can be filtered by the tag; the
factory's subflows carry the same name and tag.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from typing import Any
from uuid import UUID

RUN_TAG_PREFIX = "run:"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")

log = logging.getLogger("octomed_data.flows")


def flow_run_run_id(recipe_name: str, flow_run_id: UUID | str, created: _dt.datetime | None) -> str:
    """The run id of a flow run started without one: the same for every retry of that flow run."""
    hex_id = UUID(str(flow_run_id)).hex
    when = created or _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
    if when.tzinfo is not None:
        when = when.astimezone(_dt.UTC)
    name = _UNSAFE.sub("-", recipe_name).strip("-._") or "run"
    return f"{name[:80]}-{when.strftime('%Y%m%dT%H%M%S')}-{hex_id[:8]}"


def current_flow_run() -> Any | None:
    """The flow run this code runs in (Prefect's run context), or None outside a flow run."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return getattr(ctx, "flow_run", None) if ctx is not None else None


def derived_run_id(recipe_name: str) -> str | None:
    """:func:`flow_run_run_id` of the current flow run; None outside a flow run."""
    fr = current_flow_run()
    if fr is None:
        return None
    return flow_run_run_id(recipe_name, fr.id, getattr(fr, "created", None) or fr.expected_start_time)


def run_tag(run_id: str) -> str:
    return f"{RUN_TAG_PREFIX}{run_id}"


def label_flow_run(run_id: str) -> bool:
    """Name the current flow run after ``run_id`` and tag it ``run:<run_id>`` (outside a flow run:
    nothing). A failed API call is one warning, never the flow's failure. True when labelled."""
    fr = current_flow_run()
    if fr is None:
        return False
    tags = list(fr.tags or [])
    if fr.name == run_id and run_tag(run_id) in tags:
        return True
    tags = [*(t for t in tags if not t.startswith(RUN_TAG_PREFIX)), run_tag(run_id)]
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.update_flow_run(fr.id, name=run_id, tags=tags)
    except Exception as exc:  # the name is for people: the run goes on under its old name
        log.warning("could not name flow run %s after run %s: %s", fr.id, run_id, exc)
        return False
    fr.name, fr.tags = run_id, tags  # the context's copy, so a second prepare() asks nothing
    return True


def run_name() -> str:
    """``flow_run_name`` of the run flows: the run id from the moment the flow run starts (so the
    engine's own log lines say it too), derived as :func:`flow_run_run_id` when the form left it
    empty; the flow run's own name when it cannot be told yet (an unreadable recipe fails later,
    in :func:`flows.common.prepare`, with its own message)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    fallback = str(getattr(getattr(ctx, "flow_run", None), "name", "") or "run")
    try:
        run = (ctx.parameters or {}).get("run")
        get = run.get if isinstance(run, dict) else (lambda k: getattr(run, k, None))
        if get("run_id"):
            return str(get("run_id"))
        from octomed_data.recipe import load_recipe

        return derived_run_id(load_recipe(get("recipe_path") or "demo").name) or fallback
    except Exception:
        return fallback
