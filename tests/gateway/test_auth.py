"""API keys and request rates, decided with a hand-driven clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetserve.errors import OpenAIError
from gateway.auth import KeyStore, hash_key
from gateway.settings import ApiKey


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _key(name: str, secret: str, **fields: object) -> ApiKey:
    return ApiKey(name=name, key_sha256=hash_key(secret), **fields)  # type: ignore[arg-type]


def _status(call: object) -> tuple[int, str | None]:
    with pytest.raises(OpenAIError) as error:
        call()  # type: ignore[operator]
    return error.value.status, error.value.code


def test_keys_are_checked_by_hash() -> None:
    store = KeyStore([_key("a", "secret-a")], None)
    assert store.enabled
    assert store.authenticate("Bearer secret-a").name == "a"
    assert _status(lambda: store.authenticate(None)) == (401, "missing_api_key")
    assert _status(lambda: store.authenticate("secret-a")) == (401, "missing_api_key")
    assert _status(lambda: store.authenticate("Bearer wrong")) == (401, "invalid_api_key")
    assert not KeyStore([], None).enabled  # no keys anywhere: open


def test_models_not_allowed_get_403() -> None:
    key = _key("a", "s", models=["m1"])
    store = KeyStore([key], None)
    assert store.admit(key, "m1") == {}
    assert _status(lambda: store.admit(key, "m2")) == (403, "model_not_allowed")


def test_rpm_budget_refills_over_time_and_says_when() -> None:
    clock = Clock()
    key = _key("a", "s", rpm=3)
    store = KeyStore([key], None, clock=clock)
    remaining = [store.admit(key, "m")["x-ratelimit-remaining-requests"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    with pytest.raises(OpenAIError) as error:
        store.admit(key, "m")
    assert error.value.status == 429 and error.value.code == "rate_limit_exceeded"
    assert error.value.headers["retry-after"] == "20"  # 3 per minute: one every 20 s
    assert error.value.headers["x-ratelimit-limit-requests"] == "3"
    clock.now += 20
    assert store.admit(key, "m")["x-ratelimit-remaining-requests"] == "0"


def test_keys_file_reload_adds_and_revokes(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n- name: a\n  key_sha256: {hash_key('sa')}\n")
    store = KeyStore([], path)
    assert store.authenticate("Bearer sa").name == "a"
    path.write_text(f"keys:\n- name: b\n  key_sha256: {hash_key('sb')}\n")
    store.reload()
    assert store.authenticate("Bearer sb").name == "b"
    assert _status(lambda: store.authenticate("Bearer sa"))[0] == 401  # revoked
    path.write_text("keys: [ {broken")
    store.reload()  # a broken file keeps the keys in force
    assert store.authenticate("Bearer sb").name == "b"
    path.write_text("keys: []\n")
    store.reload()
    assert store.enabled  # a keys file with no keys admits nobody, it does not open the gateway
    assert _status(lambda: store.authenticate("Bearer sb"))[0] == 401


def test_tokens_per_minute_are_charged_after_the_answer() -> None:
    clock = Clock()
    key = _key("a", "s", tpm=100)
    store = KeyStore([key], None, clock=clock)
    assert store.admit(key, "m")["x-ratelimit-remaining-tokens"] == "100"
    store.charge(key, 150)  # an answer may overdraw the budget...
    with pytest.raises(OpenAIError) as error:
        store.admit(key, "m")  # ...then the key waits until it is positive again
    assert error.value.status == 429
    assert error.value.headers["x-ratelimit-limit-tokens"] == "100"
    assert error.value.headers["retry-after"] == "31"  # from -50 to 1 at 100/min
    clock.now += 31
    assert store.admit(key, "m")["x-ratelimit-remaining-tokens"] == "1"


def test_usage_meter_reads_split_events_and_strips_the_usage_event() -> None:
    from gateway.usage import UsageMeter

    seen: list[int] = []
    stream = (
        b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 3, "total_tokens": 4}}\n\n'
        b"data: [DONE]\n\n"
    )
    for strip, expected in (
        (False, stream),
        (True, stream.replace(stream.split(b"\n\n")[1] + b"\n\n", b"")),
    ):
        meter = UsageMeter(seen.append, strip=strip)
        out = b"".join(meter.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))
        out += meter.finish()
        assert out == expected
    assert seen == [4, 4]
    meter = UsageMeter(seen.append)
    meter.read_body(b'{"usage": {"total_tokens": 9}}')
    meter.finish()
    assert seen[-1] == 9
