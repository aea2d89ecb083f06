"""How many replicas a model needs for its load. Pure decisions, unit-tested.

Under Ray (`fleetserve ray deploy`), Ray Serve calls `ServePolicy` (its custom
autoscaling hook, one per model) with the load each replica reports from its engine
(`ongoing_requests`: running + waiting, replica.py); Serve then
holds the result between the model's min and max replicas and applies the
up/down delays, so a burst shorter than the delay starts nothing.

A model with ``min_replicas: 0`` (or ``load: on_demand``) has no replica to report
when it is scaled to zero: the gateways hold its requests and tell the controller
(``POST /models/NAME/demand``, every second while they hold one), and the policy
reads that demand from the controller (``GET /models``) in the background, so that
Serve's control loop never waits on the network. A demand starts one replica at
once (Serve skips the upscale delay from zero); without requests the model goes
back to zero after ``downscale_delay_s``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx

from controller.protocol import ModelState
from fleetserve import constants
from fleetserve.auth import client_tls, client_token

logger = logging.getLogger(__name__)

#: The custom metric replicas report to Ray Serve.
ONGOING_REQUESTS = "ongoing_requests"


def desired_replicas(
    ongoing: Iterable[float],
    target_per_replica: float,
    current: int,
    held: bool = False,
    min_replicas: int = 1,
) -> int:
    """Replicas that bring running + waiting requests per replica down to the target.

    ``ongoing`` holds one figure per replica that reported; with none (all still
    loading, or none running) the count stays as it is. ``held``: a gateway holds a
    request for the model, which then needs a replica at least. Never below
    ``min_replicas`` (0: the model may scale to zero).
    """
    reports = list(ongoing)
    wanted = math.ceil(sum(reports) / target_per_replica) if reports else current
    return max(wanted, min_replicas, int(held))


class ServePolicy:
    """Ray Serve's policy for one model (a class: Serve makes one per deployment, with the
    deployment's ``policy_kwargs``, and calls it every control-loop tick).

    The cluster token is found where the model's workers find theirs (the Serve
    controller's ``$FLEETSERVE_CLUSTER_TOKEN``, else the token file of its machine):
    policy_kwargs are logged by Serve, so no secret goes through them.
    """

    def __init__(
        self,
        model: str,
        controller_url: str,
        min_replicas: int = 1,
        ca_file: str | None = None,
    ) -> None:
        self.model = model
        self.min_replicas = min_replicas
        self._url = f"{controller_url.rstrip('/')}/models"
        self._ca_file = ca_file
        self._held = False
        self._asked_at = float("-inf")
        self._pending: Future[bool] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"fleetserve-demand-{model}")

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        reports = (ctx.aggregated_metrics or {}).get(ONGOING_REQUESTS, {})
        target = ctx.config.target_ongoing_requests
        held = self._demand() if self.min_replicas == 0 else False
        current = ctx.current_num_replicas
        return desired_replicas(reports.values(), target, current, held, self.min_replicas), {}

    def _demand(self) -> bool:
        """Whether a gateway holds a request for the model: the last answer, asked again in
        the background at most every DEMAND_INTERVAL_S."""
        if self._pending is not None and self._pending.done():
            try:
                self._held = self._pending.result()
            except (httpx.HTTPError, ValueError) as exc:  # keeps the last answer
                logger.warning("could not read %s's demand at %s: %s", self.model, self._url, exc)
            self._pending = None
        now = time.monotonic()
        if self._pending is None and now - self._asked_at >= constants.DEMAND_INTERVAL_S:
            self._asked_at = now
            self._pending = self._pool.submit(self._ask)
        return self._held

    def _ask(self) -> bool:
        token = client_token(None)
        response = httpx.get(
            self._url,
            headers=token.header() if token else None,
            verify=client_tls(self._ca_file),
            timeout=constants.RAY_DEMAND_TIMEOUT_S,
        )
        response.raise_for_status()
        for model in response.json():
            state = ModelState.model_validate(model)
            if state.name == self.model:
                age = state.demand_age_s
                return age is not None and age < constants.DEMAND_FRESH_S
        return False
