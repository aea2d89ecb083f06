"""How many replicas a model needs for its load. Pure decisions, unit-tested.

Under Ray (`fleetserve ray deploy`), Ray Serve calls `serve_policy` (its custom
autoscaling hook) with the load each replica reports from its engine
(`ongoing_requests`: running + waiting, replica.py); Serve then
holds the result between the model's min and max replicas and applies the
up/down delays, so a burst shorter than the delay starts nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

#: The custom metric replicas report to Ray Serve.
ONGOING_REQUESTS = "ongoing_requests"


def desired_replicas(ongoing: Iterable[float], target_per_replica: float, current: int) -> int:
    """Replicas that bring running + waiting requests per replica down to the target.

    ``ongoing`` holds one figure per replica that reported; with none (all still
    loading) the count stays as it is.
    """
    reports = list(ongoing)
    if not reports:
        return current
    return max(1, math.ceil(sum(reports) / target_per_replica))


def serve_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Ray Serve's custom policy signature: (AutoscalingContext) -> (replicas, policy state)."""
    reports = (ctx.aggregated_metrics or {}).get(ONGOING_REQUESTS, {})
    target = ctx.config.target_ongoing_requests
    return desired_replicas(reports.values(), target, ctx.current_num_replicas), {}
