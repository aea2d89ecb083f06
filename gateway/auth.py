"""API keys: who is calling, which models they may use, and how often.

Keys are kept as SHA-256 hashes only. A presented key is hashed, looked up,
and confirmed with a constant-time comparison. The keys file is re-read when
it changes (and on SIGHUP), so keys are added and revoked without a restart;
a file that fails to parse keeps the previous keys in force.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleetserve.errors import ConfigError, OpenAIError
from gateway.settings import ApiKey, hash_key, load_keys_file

logger = logging.getLogger(__name__)


@dataclass
class _Bucket:
    """A per-minute budget: full at the limit, refilled at limit/60 per second."""

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
        self._buckets: dict[tuple[str, str], _Bucket] = {}  # (key name, requests|tokens)
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

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> ApiKey:
        """The key of an ``Authorization: Bearer KEY`` header, or else of an ``x-api-key: KEY``
        header (Anthropic's way, which its SDK and many agents use); 401 if missing or unknown."""
        if authorization and authorization.startswith("Bearer "):
            given = authorization.removeprefix("Bearer ")
        elif api_key:
            given = api_key
        else:
            raise OpenAIError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' "
                "(or 'x-api-key: YOUR_KEY').",
                code="missing_api_key",
            )
        presented = hash_key(given.strip())
        key = self._by_hash.get(presented)
        if key is None or not hmac.compare_digest(key.key_sha256, presented):
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key

    def admit(self, key: ApiKey, model: str) -> dict[str, str]:
        """403 if ``model`` is not allowed, 429 past a rate; else the x-ratelimit headers."""
        if key.models is not None and model not in key.models:
            raise OpenAIError(
                403,
                f"The key '{key.name}' may not use the model `{model}`.",
                code="model_not_allowed",
                param="model",
            )
        headers: dict[str, str] = {}
        # tokens first: they cost nothing here (charged when the answer's usage is known), so a
        # request refused for tokens does not also spend one of the key's requests
        if key.tpm is not None:
            headers |= self._take(key, "tokens", key.tpm, cost=0)
        if key.rpm is not None:
            headers |= self._take(key, "requests", key.rpm, cost=1)
        return headers

    def charge(self, key: ApiKey, tokens: int) -> None:
        """Count an answer's tokens against the key's tokens-per-minute budget."""
        if key.tpm is not None:
            self._bucket(key, "tokens", key.tpm).tokens -= tokens

    def _bucket(self, key: ApiKey, kind: str, per_minute: int) -> _Bucket:
        """The key's bucket of ``kind``, refilled for the time since it was last used."""
        now = self._clock()
        bucket = self._buckets.get((key.name, kind))
        if bucket is None:
            bucket = self._buckets[(key.name, kind)] = _Bucket(tokens=per_minute, updated=now)
        bucket.tokens = min(per_minute, bucket.tokens + (now - bucket.updated) * per_minute / 60)
        bucket.updated = now
        return bucket

    def _take(self, key: ApiKey, kind: str, per_minute: int, cost: int) -> dict[str, str]:
        bucket = self._bucket(key, kind, per_minute)
        rate_per_s = per_minute / 60
        if bucket.tokens < 1:
            wait_s = (1 - bucket.tokens) / rate_per_s
            raise OpenAIError(
                429,
                f"Rate limit reached for key '{key.name}': {per_minute} {kind} per minute. "
                f"Try again in {wait_s:.1f}s.",
                code="rate_limit_exceeded",
                headers={
                    "retry-after": str(math.ceil(wait_s)),
                    f"x-ratelimit-limit-{kind}": str(per_minute),
                    f"x-ratelimit-remaining-{kind}": "0",
                    f"x-ratelimit-reset-{kind}": f"{wait_s:.3f}s",
                },
            )
        bucket.tokens -= cost
        return {
            f"x-ratelimit-limit-{kind}": str(per_minute),
            f"x-ratelimit-remaining-{kind}": str(max(int(bucket.tokens), 0)),
            f"x-ratelimit-reset-{kind}": f"{(per_minute - bucket.tokens) / rate_per_s:.3f}s",
        }
