"""A scripted annotator for tests: labels through the labeling page's HTTP API, as the page does."""
from __future__ import annotations

import threading
import time

import httpx


def label_via_http(url: str, token: str, stop: threading.Event, limit: int | None = None) -> int:
    """Label pairs (always "right is better", both safe) until `limit` labels or `stop`; returns the count.

    Waits through connection errors: in a flow the page is up only while a stage waits for labels.
    """
    done = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as c:
        while not stop.is_set() and (limit is None or done < limit):
            try:
                nxt = c.get("/api/next").json()
                if nxt["done"]:
                    time.sleep(0.25)   # the flow serves the page in its own process: poll gently
                    continue
                r = c.post("/api/labels", json={"impression_id": nxt["item"]["impression_id"], "better": "right",
                                                "left": {"safe": True, "harm_category": None},
                                                "right": {"safe": True, "harm_category": None}})
            except httpx.TransportError:
                time.sleep(0.25)
                continue
            if r.status_code == 201:
                done += 1
    return done
