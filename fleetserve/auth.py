"""The cluster token, and TLS for clients: how fleetserve's components trust each other.

Everything that is not a client request carries the cluster token as a bearer token: a
worker's registration, heartbeats, drain and deregistration, a gateway's routing-table
watch, `fleetserve status` and other reads of the controller. The most trusted systems
authenticate every hop this way (Kubernetes service-account tokens, Consul ACL tokens,
Ray cluster tokens); without it anyone who reaches a controller could register a worker
for any model and receive that model's prompts.

Where a process finds the token (first match wins):

- ``--cluster-token-file PATH``: one token per line (``#`` starts a comment), re-read when
  the file changes, so tokens rotate without a restart;
- ``$FLEETSERVE_CLUSTER_TOKEN``: tokens separated by commas or whitespace;
- clients only (workers, gateways, the CLI): ``paths.cluster_token_file()``, which
  `fleetserve up` writes (0600), so commands on an `up` machine need no flag.

Never on a command line, where `ps` shows it. The first token is the one sent, every one is
accepted, so a token rotates without downtime in three steps, each reaching every process
before the next: ``OLD NEW`` (both accepted, the old sent), ``NEW OLD`` (the new sent),
``NEW``. Compared in constant time, never logged (its repr says how many, not what).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
import secrets
import ssl
import time
from collections.abc import Mapping
from pathlib import Path

from fleetserve import constants, env, paths
from fleetserve.errors import ConfigError, OpenAIError

logger = logging.getLogger(__name__)

BEARER = "bearer"


def new_secret() -> str:
    """A fresh token or engine secret: SECRET_BYTES random bytes, URL-safe."""
    return secrets.token_urlsafe(constants.SECRET_BYTES)


def parse_tokens(text: str) -> list[str]:
    """Tokens in a file's or a variable's text: split on commas and whitespace, ``#`` comments."""
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return [token for line in lines for token in re.split(r"[\s,]+", line) if token]


def bearer_value(authorization: str | None) -> bytes | None:
    """The credentials of an ``Authorization: Bearer X`` header value (scheme in any case)."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip().encode() if scheme.lower() == BEARER else None


class ClusterToken:
    """The tokens a process accepts (all of them) and sends (the first)."""

    def __init__(self, tokens: list[str] | None = None, path: Path | None = None) -> None:
        self.path = path
        self._tokens: tuple[bytes, ...] = ()
        self._mtime_ns: int | None = None
        self._checked_at = time.monotonic()
        if path is not None:
            self._read(must=True)
        else:
            self._set(tokens or [], str(env.CLUSTER_TOKEN))

    def __repr__(self) -> str:  # never the tokens themselves
        where = f" from {self.path}" if self.path else ""
        return f"ClusterToken({len(self._tokens)} token(s){where})"

    def _set(self, tokens: list[str], origin: str) -> None:
        if not tokens:
            raise ConfigError(f"{origin} holds no cluster token")
        self._tokens = tuple(token.encode() for token in tokens)

    def _read(self, must: bool) -> None:
        assert self.path is not None
        try:
            self._mtime_ns = self.path.stat().st_mtime_ns
            self._set(parse_tokens(self.path.read_text()), str(self.path))
        except (OSError, ConfigError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) else str(exc)
            if must:
                raise ConfigError(
                    f"cannot read the cluster token file {self.path}: {detail}"
                ) from None
            logger.error(
                "cluster token file %s: %s; keeping the tokens read before", self.path, detail
            )

    def tokens(self) -> tuple[bytes, ...]:
        """Every accepted token; a token file is looked at again every TOKEN_FILE_POLL_S."""
        if (
            self.path is not None
            and time.monotonic() - self._checked_at >= constants.TOKEN_FILE_POLL_S
        ):
            self._checked_at = time.monotonic()
            try:
                changed = self.path.stat().st_mtime_ns != self._mtime_ns
            except OSError:
                changed = True
            if changed:
                self._read(must=False)
                logger.info(
                    "cluster token file %s re-read: %d token(s)", self.path, len(self._tokens)
                )
        return self._tokens

    def verify(self, authorization: str | None) -> bool:
        """True when an ``Authorization`` header carries one of the tokens (constant time)."""
        given = bearer_value(authorization)
        if given is None:
            return False
        matched = False
        for token in self.tokens():  # every one compared: the time says nothing of which
            matched |= hmac.compare_digest(given, token)
        return matched

    def header(self) -> dict[str, str]:
        """The header a client sends: the first token."""
        return {"Authorization": f"Bearer {self.tokens()[0].decode()}"}


def server_token(file: str | None, environ: Mapping[str, str] = os.environ) -> ClusterToken | None:
    """What a controller accepts: ``file``, else $FLEETSERVE_CLUSTER_TOKEN; None: no token."""
    if file:
        return ClusterToken(path=Path(file).expanduser())
    value = env.cluster_token(environ)
    return ClusterToken(parse_tokens(value)) if value else None


def client_token(file: str | None, environ: Mapping[str, str] = os.environ) -> ClusterToken | None:
    """What a client sends: as :func:`server_token`, else the token `fleetserve up` made."""
    token = server_token(file, environ)
    if token is None and paths.cluster_token_file().is_file():
        token = ClusterToken(path=paths.cluster_token_file())
    return token


def ensure_token_file(path: Path) -> Path:
    """``path`` holding a cluster token: made (0600, a new token) unless it exists already."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            raise ConfigError(
                f"{path} can be read by other users: `chmod 600 {path}` (or delete it and a "
                "new token is made)"
            ) from None
        return path
    with os.fdopen(fd, "w") as file:
        file.write(new_secret() + "\n")
    return path


def unauthorized(what: str = "this") -> OpenAIError:
    """The 401 for a request without the cluster token, in the error envelope."""
    return OpenAIError(
        401,
        f"{what} needs the cluster token (Authorization: Bearer TOKEN): missing or wrong",
        code="invalid_cluster_token",
        headers={"WWW-Authenticate": 'Bearer realm="fleetserve"'},
    )


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_tls(ca_file: str | None) -> ssl.SSLContext | bool:
    """What a client checks servers' certificates against: ``ca_file`` (a private CA, e.g.
    a self-signed certificate) when given, else the system's authorities (True)."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else True
