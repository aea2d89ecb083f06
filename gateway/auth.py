"""API keys: who is calling, which models they may use, and how often.

Keys are kept as SHA-256 hashes only. A presented key is hashed, looked up,
and confirmed with a constant-time comparison. The keys file is re-read when
it changes (and on SIGHUP), so keys are added and revoked without a restart;
a file that fails to parse keeps the previous keys in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleetserve.config import ApiKey, ConfigError, load_keys_file
from fleetserve.errors import OpenAIError

logger = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class _Bucket:
    """Requests-per-minute token bucket: ``rpm`` at once, refilled at rpm/60 per second."""

    tokens: float
    updated: float


class KeyStore:
    def __init__(
        self,
        inline: list[ApiKey],
        path: Path | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inline = inline
        self._path = path
        self._clock = clock
        self._by_hash: dict[str, ApiKey] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._file_stamp: tuple[float, int] | None = None
        self.reload()

    @property
    def enabled(self) -> bool:
        return bool(self._by_hash) or self._path is not None

    def reload(self) -> None:
        """Read the keys again; on a broken file keep what was in force."""
        keys = list(self._inline)
        if self._path is not None:
            try:
                self._file_stamp = self._stamp()
                keys += load_keys_file(self._path)
            except ConfigError as exc:
                logger.error("API keys not reloaded, the previous ones stay in force: %s", exc)
                return
        self._by_hash = {key.key_sha256: key for key in keys}
        logger.info("API keys loaded: %s", ", ".join(k.name for k in keys) or "none")

    def _stamp(self) -> tuple[float, int] | None:
        assert self._path is not None
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime, stat.st_size

    def reload_if_changed(self) -> None:
        if self._path is not None and self._stamp() != self._file_stamp:
            self.reload()

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key of an ``Authorization: Bearer KEY`` header; 401 if missing or unknown."""
        if not authorization or not authorization.startswith("Bearer "):
            raise OpenAIError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                code="missing_api_key",
            )
        presented = hash_key(authorization.removeprefix("Bearer ").strip())
        key = self._by_hash.get(presented)
        if key is None or not hmac.compare_digest(key.key_sha256, presented):
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key

    def admit(self, key: ApiKey, model: str) -> dict[str, str]:
        """403 if ``model`` is not allowed, 429 past the rate; else the x-ratelimit headers."""
        if key.models is not None and model not in key.models:
            raise OpenAIError(
                403,
                f"The key '{key.name}' may not use the model `{model}`.",
                code="model_not_allowed",
                param="model",
            )
        if key.rpm is None:
            return {}
        now = self._clock()
        bucket = self._buckets.get(key.name)
        if bucket is None:
            bucket = self._buckets[key.name] = _Bucket(tokens=key.rpm, updated=now)
        rate_per_s = key.rpm / 60
        bucket.tokens = min(key.rpm, bucket.tokens + (now - bucket.updated) * rate_per_s)
        bucket.updated = now
        if bucket.tokens < 1:
            wait_s = (1 - bucket.tokens) / rate_per_s
            raise OpenAIError(
                429,
                f"Rate limit reached for key '{key.name}': {key.rpm} requests per minute. "
                f"Try again in {wait_s:.1f}s.",
                code="rate_limit_exceeded",
                headers={
                    "retry-after": str(math.ceil(wait_s)),
                    "x-ratelimit-limit-requests": str(key.rpm),
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": f"{wait_s:.3f}s",
                },
            )
        bucket.tokens -= 1
        return {
            "x-ratelimit-limit-requests": str(key.rpm),
            "x-ratelimit-remaining-requests": str(int(bucket.tokens)),
            "x-ratelimit-reset-requests": f"{(key.rpm - bucket.tokens) / rate_per_s:.3f}s",
        }
