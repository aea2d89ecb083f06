"""The whole cluster with `fake` engines: real controller, gateway and worker processes.

What a gateway does without needing processes of its own (routing, errors, keys,
retries, usage) is tested in-process, much faster, in tests/gateway/ (inproc.py).
"""

from __future__ import annotations

import itertools
import os
import select
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from fleetserve.protocol import Registration
from gateway.auth import hash_key
from tests.conftest import module_log_dir
from tests.helpers import Load, LocalCluster, descendants, drain_under_load, free_port, wait_until

SLOW = ("--tokens-per-s", "50")  # 16 tokens take ~0.3 s: requests are in flight when we act


@pytest.fixture(scope="module")
def cluster(fleet_env: dict[str, str]) -> Iterator[LocalCluster]:
    local = LocalCluster(module_log_dir("test_cluster_fake"), fleet_env)
    for _ in range(2):
        local.add_worker("echo", "fake", "--alias", "echo-alias", engine_args=SLOW)
    local.add_worker("other", "fake", engine_args=SLOW)
    local.wait_workers("echo", 2)
    local.wait_workers("other", 1)
    yield local
    local.close()


def test_errors_are_openai_shaped(cluster: LocalCluster) -> None:
    client = cluster.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]

    url = f"{cluster.gateway_url}/v1/chat/completions"
    cases = {
        b'{"model": "echo", "messages": [': (400, "invalid_json", None),
        b'{"model": "echo"}': (400, "missing_required_parameter", "messages"),
        b'["not", "an", "object"]': (400, "invalid_json", None),
        b'{"messages": []}': (400, "missing_required_parameter", "model"),
    }
    for body, (status, code, param) in cases.items():
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, body
        error = response.json()["error"]
        assert (error["code"], error["param"], error["type"]) == (
            code,
            param,
            "invalid_request_error",
        )
        assert error["message"]

    huge = b'{"model": "echo", "messages": [], "pad": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    response = httpx.post(url, content=huge)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{cluster.gateway_url}/v1/nothing").json()["error"]["code"] == "not_found"


def test_dead_worker_is_retried_then_taken_out(cluster: LocalCluster) -> None:
    """A registered worker whose port refuses connections: 502 after trying it, then 503
    (its circuit opened at once)."""
    ghost = Registration(
        worker_id="ghost-1",
        model_names=["ghost"],
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        engine="fake",
        capacity=1,
    )
    httpx.post(
        f"{cluster.controller_url}/workers/register", json=ghost.model_dump(mode="json")
    ).raise_for_status()
    wait_until(lambda: "ghost" in cluster.gateway_models(), 10, "the gateway to see the ghost")
    url = f"{cluster.gateway_url}/v1/chat/completions"
    body = {"model": "ghost", "messages": [{"role": "user", "content": "hi"}]}
    first = httpx.post(url, json=body)
    assert first.status_code == 502
    assert first.json()["error"]["code"] == "upstream_error"
    second = httpx.post(url, json=body)
    assert second.status_code == 503
    assert second.json()["error"]["code"] == "no_healthy_worker"
    # Without heartbeats the controller expires it.
    wait_until(lambda: "ghost" not in cluster.gateway_models(), 15, "the ghost to expire")


def test_engine_death_deregisters_and_restarts(cluster: LocalCluster) -> None:
    worker = next(c for c in cluster.components if c.name == "worker-other-0")
    (old_id,) = cluster.worker_ids("other")
    engines = [
        pid
        for pid in descendants(worker.pid)
        if b"workers.fake.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert engines, "the fake engine process was not found"
    expired = 'fleetserve_controller_expirations_total{model="other"}'
    expirations = cluster.controller_metric(expired)
    for pid in engines:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not cluster.worker_ids("other"), 15, "the worker to leave")
    # It deregistered itself at once, rather than being expired for going silent.
    assert cluster.controller_metric(expired) == expirations
    (new_id,) = cluster.wait_workers("other", 1)
    assert new_id == old_id  # same agent, engine restarted
    reply = cluster.client().chat.completions.create(
        model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.choices[0].message.content == " tok0 tok1"


def test_controller_restart_fails_no_request(cluster: LocalCluster) -> None:
    before = cluster.worker_ids("echo")
    with Load(cluster.gateway_url, "echo", concurrency=4) as load:
        load.wait_requests(20)
        cluster.controller.kill_tree()
        load.wait_requests(20)  # still served from the gateway's last table
        cluster.controller = cluster.start_controller()
        wait_until(lambda: cluster.worker_ids("echo") == before, 10, "workers to re-register")
        load.wait_requests(20)
    result = load.result
    assert result.failed_before_first_chunk == [] and result.failed_mid_stream == []
    assert result.ok >= 60


def test_sigterm_drains_a_worker_without_failures(cluster: LocalCluster) -> None:
    result = drain_under_load(
        cluster, "echo", concurrency=6, max_tokens=16, before=30, after=30, timeout_s=30
    )
    assert result.failed_before_first_chunk == [] and result.failed_mid_stream == []
    wait_until(
        lambda: len(cluster.worker_ids("echo")) == 1, 5, "the drained worker to leave the table"
    )
    # put the replica back for the tests after this one
    cluster.add_worker("echo", "fake", "--alias", "echo-alias", engine_args=SLOW)
    cluster.wait_workers("echo", 2)


def test_fleetserve_status_shows_workers(cluster: LocalCluster) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetserve.cli",
            "status",
            "--controller-url",
            cluster.controller_url,
            "--gateway-url",
            cluster.gateway_url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    for worker_id in cluster.worker_ids("echo") | cluster.worker_ids("other"):
        line = next(line for line in out.splitlines() if worker_id in line)
        assert line.rstrip(" │").endswith("closed")  # the gateway's circuit for it
    assert "echo (echo-alias)" in out and "circuit" in out


def test_fleetserve_status_watch_shows_tokens_per_second_under_load(
    cluster: LocalCluster,
) -> None:
    """`status --watch` in a terminal (a pseudo-terminal here) redraws with live tokens/s."""
    import pty
    import re
    import subprocess
    import sys

    leader, follower = pty.openpty()
    status = ["status", "--watch", "0.5", "--controller-url", cluster.controller_url]
    watch = subprocess.Popen(
        [sys.executable, "-m", "fleetserve.cli", *status],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**cluster.env, "COLUMNS": "200", "LINES": "50"},
    )
    os.close(follower)
    screen = bytearray()
    # the echo row of the models table: ready, 2 ready, 0 draining, running, waiting, KV, tok/s
    echo_row = re.compile(r"│ echo\s+│ ready\s+│ 2\s+│ 0\s+│ \d+\s+│ \d+\s+│ \d+%\s+│ (\d+)\s+│")

    def tokens_per_s_shown() -> bool:
        if select.select([leader], [], [], 0.2)[0]:
            screen.extend(os.read(leader, 65536))
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
        return any(int(rate) > 0 for rate in echo_row.findall(text))

    try:
        with Load(cluster.gateway_url, "echo", concurrency=8):
            wait_until(tokens_per_s_shown, 20, "a tokens/s figure for echo", every_s=0)
        watch.send_signal(signal.SIGINT)  # Ctrl-C leaves cleanly
        assert watch.wait(10) == 0
    finally:
        watch.kill()
        os.close(leader)


def test_gateway_metrics_count_requests(cluster: LocalCluster) -> None:
    text = httpx.get(f"{cluster.gateway_url}/metrics").text
    assert 'fleetserve_gateway_requests_total{key="none",model="echo",status="200"}' in text
    assert 'fleetserve_gateway_requests_total{key="none",model="unknown",status="404"}' in text
    assert 'model="nope"' not in text  # client-chosen names do not become label values
    controller = httpx.get(f"{cluster.controller_url}/metrics").text
    assert 'fleetserve_controller_workers{model="echo",state="ready"} 2.0' in controller


def test_gateway_with_several_processes_serves_on_one_port(cluster: LocalCluster) -> None:
    with cluster.extra_gateway("gateway-multi", "--processes", "2") as (gateway, url):
        wait_until(lambda: len(descendants(gateway.pid)) >= 2, 30, "two gateway processes")
        # each process learns the table by itself; ask enough times to reach both
        wait_until(
            lambda: all("echo" in httpx.get(f"{url}/models").text for _ in range(10)),
            30,
            "every process to route echo",
        )
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        for _ in range(20):
            reply = client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert reply.choices[0].message.content == " tok0 tok1"


def test_api_keys_refuse_limit_and_revoke_without_restart(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.yaml"

    def write_keys(*entries: str) -> None:
        keys_file.write_text("keys:\n" + "".join(entries))

    team = f"- {{name: team, key_sha256: {hash_key('sk-team')}, models: [echo], rpm: 3}}\n"
    other = f"- {{name: other, key_sha256: {hash_key('sk-other')}}}\n"
    write_keys(team, other)
    with cluster.extra_gateway("gateway-keys", "--keys-file", str(keys_file)) as (gateway, url):

        def client(key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=url, api_key=key, max_retries=0)

        def chat(key: str, model: str = "echo") -> object:
            return client(key).chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )

        assert chat("sk-other")
        with pytest.raises(openai.AuthenticationError):
            chat("sk-wrong")
        with pytest.raises(openai.AuthenticationError):
            client("sk-wrong").models.list()
        assert {m.id for m in client("sk-team").models.list()} == {"echo"}  # what the key may use
        with pytest.raises(openai.PermissionDeniedError):
            chat("sk-team", model="other")  # the key allows echo only
        for _ in range(3):  # 3 per minute (the 403 above used none of them)
            chat("sk-team")
        with pytest.raises(openai.RateLimitError) as limited:
            chat("sk-team")
        assert int(limited.value.response.headers["retry-after"]) >= 1
        assert limited.value.response.headers["x-ratelimit-limit-requests"] == "3"

        write_keys(team)  # revoke "other", no restart
        wait_until(
            lambda: (
                httpx.post(
                    f"{url}/chat/completions",
                    headers={"authorization": "Bearer sk-other"},
                    json={"model": "echo", "messages": []},
                ).status_code
                == 401
            ),
            10,
            "the revoked key to be refused",
        )
        write_keys(team, other)
        gateway.proc.send_signal(signal.SIGHUP)  # reload at once
        wait_until(lambda: _ok(lambda: chat("sk-other")), 5, "the key to work again after SIGHUP")
    assert "NO API KEYS" not in gateway.log()
    assert "NO API KEYS CONFIGURED" in cluster.gateway.log()  # the open gateway says so


def _ok(call: object) -> bool:
    try:
        call()  # type: ignore[operator]
    except openai.APIError:
        return False
    return True


def test_routing_policy_is_chosen_per_model(cluster: LocalCluster) -> None:
    """Workers of `sticky` registered with the session policy: a user keeps to one worker."""
    for _ in range(2):
        cluster.add_worker("sticky", "fake", "--routing-policy", "session")
    ids = cluster.wait_workers("sticky", 2)
    client = cluster.client()
    homes: dict[str, set[str]] = {}
    for i in range(40):
        user = f"user-{i % 8}"
        raw = client.chat.completions.with_raw_response.create(
            model="sticky", messages=[{"role": "user", "content": "hi"}], max_tokens=1, user=user
        )
        homes.setdefault(user, set()).add(raw.headers["x-fleetserve-worker"])
    assert all(len(workers) == 1 for workers in homes.values()), homes
    assert set().union(*homes.values()) == ids  # 8 users spread over both workers


def test_input_limits_and_request_timeout(cluster: LocalCluster) -> None:
    # A timeout of seconds, not a fraction: a stalled machine must not make a short request late.
    limits = ("--max-tokens-limit", "1000", "--request-timeout-s", "3")
    with cluster.extra_gateway("gateway-limits", *limits) as (_, base_url):
        url = f"{base_url}/chat/completions"

        def post(**fields: object) -> httpx.Response:
            body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], **fields}
            return httpx.post(url, json=body, timeout=30)

        too_many = post(max_tokens=1001)
        assert too_many.status_code == 400
        assert too_many.json()["error"]["code"] == "max_tokens_too_large"
        assert post(max_completion_tokens="ten").json()["error"]["param"] == "max_completion_tokens"
        assert post(max_tokens=4).status_code == 200
        started = time.monotonic()
        slow = post(max_tokens=1000)  # 1000 tokens at 50/s: 20 s > 3 s
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
        assert time.monotonic() - started < 12  # cut off, not answered in full
        assert post(max_tokens=200, stream=True).status_code == 200  # first byte in time; 4 s


def test_prefix_affinity_keeps_a_prefix_home_and_spills_a_hot_one(cluster: LocalCluster) -> None:
    for _ in range(3):
        cluster.add_worker(
            "cached", "fake", "--routing-policy", "prefix_affinity", engine_args=SLOW
        )
    ids = cluster.wait_workers("cached", 3)
    client = cluster.client()

    def worker_for(system: str, question: str) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="cached",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=1,
        )
        return raw.headers["x-fleetserve-worker"]

    prompts = [f"You are assistant {i}, an expert in topic {i}. " * 10 for i in range(30)]
    homes = {}
    for system in prompts:
        seen = {worker_for(system, f"question {q}") for q in range(3)}
        assert len(seen) == 1, "one prefix, one worker while the cluster is quiet"
        homes[system] = seen.pop()
    assert set(homes.values()) == ids  # 30 prefixes use all 3 workers

    # One hot prefix, 12 at once (more than a worker's share): it spills to other workers.
    hot = [{"role": "system", "content": prompts[0]}, {"role": "user", "content": "go"}]
    with Load(cluster.gateway_url, "cached", concurrency=12, max_tokens=16, messages=hot) as load:
        load.wait_requests(36)
    assert len(load.result.workers) > 1, load.result.workers
    assert max(load.result.workers.values()) < load.result.ok  # not all on the hot prefix's home


@pytest.mark.parametrize("policy", ["round_robin", "power_of_two"])
def test_round_robin_and_power_of_two_use_every_worker(cluster: LocalCluster, policy: str) -> None:
    name = policy.replace("_", "-")
    for _ in range(2):
        cluster.add_worker(name, "fake", "--routing-policy", policy)
    ids = cluster.wait_workers(name, 2)
    client = cluster.client()
    picks = [
        client.chat.completions.with_raw_response.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        ).headers["x-fleetserve-worker"]
        for _ in range(12)
    ]
    assert set(picks) == ids
    if policy == "round_robin":  # strictly in turn
        assert all(a != b for a, b in itertools.pairwise(picks))
