"""Reading a running server's /metrics page, as the tests that watch it from outside need."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def metric(metrics_url: str, name: str, timeout: float = 30.0) -> float:
    """The first sample called ``name`` on the page at ``metrics_url``."""
    with urllib.request.urlopen(metrics_url, timeout=timeout) as resp:
        text = resp.read().decode()
    return next(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def inflight(metrics_url: str, timeout: float = 30.0) -> float:
    """Calls the server is handling now (rarechange_inflight_requests)."""
    return metric(metrics_url, "rarechange_inflight_requests", timeout)
