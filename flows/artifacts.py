"""Prefect artifacts of a run: markdown reports, links and live progress bars in the Prefect UI.

An artifact is a view of the run, never a reason to fail it: every helper logs and carries on
when the Prefect API refuses one.
"""
from __future__ import annotations

from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext


def artifact_key(run_id: str, suffix: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only.
    base = "".join(c if c.isalnum() else "-" for c in run_id.lower())
    return f"{base}-{suffix}"[:100]


def _try(what: str, fn, *args, **kwargs):
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return None  # called outside a flow run (a stage run directly): no run to attach it to
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        get_run_logger().warning(f"could not {what}: {e}")
        return None


def markdown(key: str, text: str, description: str) -> None:
    _try(f"create artifact {key}", create_markdown_artifact, key=key, markdown=text, description=description)


def link(key: str, url: str, text: str, description: str) -> None:
    _try(f"create link artifact {key}", create_link_artifact, link=url, link_text=text, key=key,
         description=description)


def table(key: str, rows: list[dict], description: str) -> None:
    _try(f"create table artifact {key}", create_table_artifact, table=rows, key=key, description=description)


def name_flow_run(name: str) -> None:
    """Name the current flow run (Prefect picks 'snobbish-skunk'): the UI then says which run it is."""
    from prefect.client.orchestration import get_client
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return

    def rename():
        with get_client(sync_client=True) as client:
            client.update_flow_run(ctx.flow_run.id, name=name)
    _try(f"name the flow run {name}", rename)


def progress(key: str, percent: float, description: str) -> UUID | None:
    """A progress bar in the UI (0-100); update it with `update_progress`."""
    return _try(f"create progress artifact {key}", create_progress_artifact, progress=percent, key=key,
                description=description)


def update_progress(artifact_id: UUID | None, percent: float, description: str | None = None) -> None:
    if artifact_id is not None:
        _try("update progress artifact", update_progress_artifact, artifact_id=artifact_id,
             progress=min(100.0, percent), description=description)
