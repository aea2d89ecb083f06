"""Red team: what someone who reaches fleetserve's ports can do, tried on real processes.

A cluster as an operator runs it: a cluster token, API keys on the gateway, a worker with
its status server. The attacker has no token, a wrong one, or another cluster's; tries to
register a rogue worker (to receive a model's prompts), drain or remove real ones, read the
table with every engine's address; goes around the gateway to the engines (the fake one
here, and a Ray replica's dashboard; vLLM and llama-server in their own modules, with the
check this module defines, tests/helpers.py); holds connections
open silently, a byte a second, by the thousand; sends a 1 MB header. Afterwards no log,
/metrics page or `ps` listing may hold a secret. The limits themselves are tested
in-process with short deadlines (tests/fleetserve/test_http.py, tests/workers/test_relay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import resource
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from controller.settings import ControllerSettings
from fleetserve.auth import client_tls, ensure_token_file, new_secret
from fleetserve.cli.harness import Cluster
from fleetserve.protocol import Heartbeat, Registration, WorkerLoad
from gateway.settings import GatewaySettings, hash_key
from tests.conftest import module_log_dir
from tests.helpers import (
    LocalCluster,
    assert_engine_refuses_everyone_but_gateways,
    free_port,
    ray_dashboard,
    ray_head_port,
    wait_until,
)
from workers.settings import WorkerSettings

LOG_DIR = module_log_dir("test_security")
API_KEY = "sk-fs-" + new_secret()
HEADER_TIMEOUT_S = 2.0
# What an attacker sends instead of the cluster token (given the token, for the last one).
WRONG: dict[str, Callable[[str], dict[str, str]]] = {
    "no token": lambda _: {},
    "wrong token": lambda _: {"Authorization": "Bearer not-the-token"},
    "another cluster's token": lambda _: {"Authorization": f"Bearer {new_secret()}"},
    "the token, not as a bearer": lambda token: {"Authorization": token},
}


@dataclass
class Secured:
    cluster: LocalCluster
    token: str
    token_file: Path
    status_url: str  # the worker agent's status server
    worker_id: str

    def gateway(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.cluster.gateway_url}/v1", api_key=API_KEY, max_retries=0
        )


@pytest.fixture(scope="module")
def env(fleet_env: dict[str, str]) -> dict[str, str]:
    """The tests' environment, without a cluster token an operator's shell may have."""
    return {k: v for k, v in fleet_env.items() if k != "FLEETSERVE_CLUSTER_TOKEN"}


@pytest.fixture(scope="module")
def secured(env: dict[str, str]) -> Iterator[Secured]:
    token_file = ensure_token_file(LOG_DIR / "secrets" / "cluster-token")
    keys_file = LOG_DIR / "secrets" / "keys.yaml"
    keys_file.write_text(f"keys: [{{name: team-a, key_sha256: {hash_key(API_KEY)}}}]\n")
    limits = {"header_timeout_s": HEADER_TIMEOUT_S}
    cluster = LocalCluster(
        LOG_DIR,
        env,
        cluster_token_file=token_file,
        controller=ControllerSettings(**limits),
        gateway=GatewaySettings(keys_file=str(keys_file), **limits),
    )
    try:
        status_port = free_port()
        flags = ["--status-port", str(status_port), "--header-timeout-s", str(HEADER_TIMEOUT_S)]
        cluster.add_worker("echo", "fake", *flags)
        (worker_id,) = cluster.wait_workers("echo", 1)
        token = token_file.read_text().strip()
        yield Secured(cluster, token, token_file, f"http://127.0.0.1:{status_port}", worker_id)
    finally:
        cluster.close()


def _is_401(response: httpx.Response, code: str) -> bool:
    error = response.json()["error"]
    return response.status_code == 401 and (error["type"], error["code"]) == (
        "authentication_error",
        code,
    )


# -- the control plane --------------------------------------------------------------------


@pytest.mark.parametrize("attempt", list(WRONG))
def test_without_the_cluster_token_the_controller_refuses_everything(
    secured: Secured, attempt: str
) -> None:
    cluster, headers = secured.cluster, WRONG[attempt](secured.token)
    with socket.socket() as rogue_listener:  # where a rogue worker would receive prompts
        rogue_listener.bind(("127.0.0.1", 0))
        rogue_listener.listen()
        rogue_listener.setblocking(False)
        rogue = Registration(
            worker_id="rogue-1",
            model_names=["echo", "gpt-4o"],
            base_url=f"http://127.0.0.1:{rogue_listener.getsockname()[1]}/v1",
            engine="fake",
            capacity=100,
        )
        beat = Heartbeat(worker_id=secured.worker_id, load=WorkerLoad(waiting=1000))
        http = httpx.Client(base_url=cluster.controller_url, headers=headers)
        calls = [
            http.post("/workers/register", json=rogue.model_dump(mode="json")),
            http.post("/workers/heartbeat", json=beat.model_dump(mode="json")),
            http.post(f"/workers/{secured.worker_id}/drain"),
            http.delete(f"/workers/{secured.worker_id}"),
            http.get("/routes", params={"timeout_s": 0}),
            http.get("/workers"),
            http.post("/workers/register", content=b"not even json"),
        ]
        http.close()
        for response in calls:
            assert _is_401(response, "invalid_cluster_token"), response.request.url
        # The real worker is as it was; the rogue reaches no gateway.
        (worker,) = cluster.table().workers
        assert (worker.worker_id, worker.state.value) == (secured.worker_id, "ready")
        reply = secured.gateway().chat.completions.with_raw_response.create(
            model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.headers["x-fleetserve-worker"] == secured.worker_id
        assert "gpt-4o" not in {m.id for m in secured.gateway().models.list()}
        with pytest.raises(BlockingIOError):
            rogue_listener.accept()  # nobody ever called it


def test_fleetserve_status_needs_the_token_and_shows_no_secret(
    secured: Secured, env: dict[str, str]
) -> None:
    cmd = [sys.executable, "-m", "fleetserve.cli", "status", "--controller-url"]
    cmd.append(secured.cluster.controller_url)
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "needs the cluster token" in refused.stdout
    cmd += ["--cluster-token-file", str(secured.token_file)]
    shown = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and secured.worker_id in shown.stdout, shown.stdout
    (engine,) = secured.cluster.routes().workers
    assert engine.engine_secret and engine.engine_secret not in shown.stdout
    assert secured.token not in shown.stdout
    # the table gateways get has the secret; the one everyone else sees does not
    (view,) = secured.cluster.table().workers
    assert view.engine_secret is None


def test_a_controller_on_a_public_address_without_a_token_refuses_to_start(
    env: dict[str, str],
) -> None:
    cmd = [sys.executable, "-m", "fleetserve.cli", "controller", "--host", "0.0.0.0"]
    cmd += ["--port", str(free_port())]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "--insecure" in refused.stderr and "--cluster-token-file" in refused.stderr


# -- the engines --------------------------------------------------------------------------


def test_the_fake_engine_refuses_every_route_around_the_gateway(secured: Secured) -> None:
    """(vLLM's and llama-server's engines: the same check in tests/test_cluster_vllm.py and
    tests/workers/llamacpp/test_llama_server.py, whose engines are running anyway.)"""
    assert_engine_refuses_everyone_but_gateways(secured.cluster, secured.worker_id)
    chunks = secured.gateway().chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _host_address() -> str | None:
    """An address of this machine that is not loopback (a "node's address"), if any."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: the kernel picks the interface
        address: str = probe.getsockname()[0]
        if not ipaddress.ip_address(address).is_loopback:
            return address
    return None


@pytest.mark.ray
@pytest.mark.skipif(_host_address() is None, reason="no non-loopback address on this machine")
def test_the_ray_dashboard_of_a_multinode_replica_is_not_on_the_nodes_address(
    secured: Secured,
) -> None:
    cluster, node = secured.cluster, _host_address()
    ray_port = ray_head_port()
    flags = ["--nodes", f"{node},127.0.0.2", "--ray-port", str(ray_port), "--host", "127.0.0.1"]
    ranks = [cluster.add_worker("spanning", "fake", *flags, "--node-rank", str(r)) for r in (0, 1)]
    try:
        cluster.wait_workers("spanning", 1, timeout_s=240)
        assert secured.gateway().completions.create(model="spanning", prompt="x", max_tokens=2)
        jobs = httpx.URL(ray_dashboard(ranks[0].log())).join("/api/jobs/")
        assert httpx.get(jobs, timeout=10).status_code == 200
        with pytest.raises(httpx.ConnectError):  # the Jobs API would run any command
            httpx.get(jobs.copy_with(host=node), timeout=10)
    finally:
        for rank in ranks:
            rank.stop(60)


# -- HTTP hygiene -----------------------------------------------------------------------


def _servers(secured: Secured) -> dict[str, tuple[str, int]]:
    """Every listener of the cluster: gateway, controller, the agent's status server, the relay."""
    (worker,) = [w for w in secured.cluster.table().workers if w.worker_id == secured.worker_id]
    urls = {
        "gateway": secured.cluster.gateway_url,
        "controller": secured.cluster.controller_url,
        "status server": secured.status_url,
        "engine relay": worker.base_url.removesuffix("/v1"),
    }
    return {name: (httpx.URL(url).host, httpx.URL(url).port or 80) for name, url in urls.items()}


async def _attack_and_serve(secured: Secured) -> dict[str, tuple[bytes, float, bytes, float]]:
    """Against every server at once: a silent connection and a slow loris (a byte a second),
    while real requests go on being answered; what each attacker got, and when."""
    loop = asyncio.get_running_loop()

    async def silent(host: str, port: int) -> tuple[bytes, float]:
        started = loop.time()
        reader, writer = await asyncio.open_connection(host, port)
        answer = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        return answer, loop.time() - started

    async def loris(host: str, port: int) -> tuple[bytes, float]:
        started = loop.time()
        reader, writer = await asyncio.open_connection(host, port)
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 600

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in request:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(1.0)

        dripping = asyncio.create_task(drip())
        answer = await asyncio.wait_for(reader.read(), 60)
        dripping.cancel()
        writer.close()
        return answer, loop.time() - started

    servers = _servers(secured)
    attacks = {
        name: asyncio.gather(silent(*address), loris(*address)) for name, address in servers.items()
    }
    client = openai.AsyncOpenAI(
        base_url=f"{secured.cluster.gateway_url}/v1", api_key=API_KEY, max_retries=0
    )
    async with client, httpx.AsyncClient(timeout=10) as http:
        for _ in range(5):  # served meanwhile, by every server
            reply = await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert reply.choices[0].message.content
            for url in (secured.cluster.controller_url, secured.status_url):
                assert (await http.get(f"{url}/health")).status_code == 200
            await asyncio.sleep(0.2)
        results = {}
        for name, attack in attacks.items():
            (silent_answer, silent_s), (loris_answer, loris_s) = await attack
            results[name] = (silent_answer, silent_s, loris_answer, loris_s)
    return results


def test_silent_and_slow_loris_connections_are_cut_and_block_no_one(secured: Secured) -> None:
    for name, (silent, silent_s, loris, loris_s) in asyncio.run(_attack_and_serve(secured)).items():
        for answer, took_s in ((silent, silent_s), (loris, loris_s)):
            assert answer.startswith(b"HTTP/1.1 408"), (name, answer)
            assert took_s >= HEADER_TIMEOUT_S * 0.9, (name, took_s)  # not before its time


def test_a_1mb_header_is_refused_by_every_server(secured: Secured) -> None:
    for name, (host, port) in _servers(secured).items():
        response = httpx.get(f"http://{host}:{port}/health", headers={"x-big": "a" * 1_000_000})
        assert response.status_code in (431, 400), (name, response.status_code)
    reply = secured.gateway().chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.choices[0].message.content  # nothing crashed


def test_8000_idle_connections_do_not_stop_new_requests(secured: Secured) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 8500:
        pytest.skip(f"needs 8500 open files; the hard limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20_000)), hard))
    # a gateway whose heads may take a minute: all 8000 stay open while requests are served
    with secured.cluster.extra_gateway("gateway-idle", "--header-timeout-s", "60") as (_, url):
        port = int(url.rsplit(":", 1)[1].removesuffix("/v1"))
        idle: list[socket.socket] = []
        try:
            for _ in range(8000):
                idle.append(socket.create_connection(("127.0.0.1", port)))
            wait_until(lambda: _established(port) >= 8000, 60, "8000 connections accepted")
            client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=30)
            messages = [{"role": "user", "content": "hi"}]
            for _ in range(2):
                reply = client.chat.completions.create(
                    model="echo",
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=2,
                )
                assert reply.choices[0].message.content
                chunks = client.chat.completions.create(
                    model="echo",
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=2,
                    stream=True,
                )
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert _established(port) >= 8000  # they were held, not dropped, meanwhile
        finally:
            for sock in idle:
                sock.close()


def _established(port: int) -> int:
    """Server-side connections on ``port`` in ESTABLISHED state (from /proc/net/tcp)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


# -- TLS --------------------------------------------------------------------------------


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA made here, and a certificate it signed for 127.0.0.1: (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetserve test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].chmod(0o600)
    return paths


def test_tls_on_gateway_and_controller_with_a_ca_clients_trust(
    secured: Secured, env: dict[str, str]
) -> None:
    ca, cert, key = _certificates(LOG_DIR / "tls")
    tls = {"tls_cert_file": str(cert), "tls_key_file": str(key)}
    log_dir = LOG_DIR / "tls"
    cluster = Cluster.on_free_ports(
        log_dir,
        ControllerSettings(**tls),
        GatewaySettings(**tls, ca_file=str(ca), keys_file=str(LOG_DIR / "secrets" / "keys.yaml")),
        env=env,
        cluster_token_file=secured.token_file,
    )
    try:
        assert cluster.controller_url.startswith("https://")
        cluster.add_replica(WorkerSettings(engine="fake", served_name="sealed"), "worker-sealed")
        cluster.wait_routed("sealed", 1, timeout_s=120)  # the worker registered over TLS
        with httpx.Client(verify=client_tls(str(ca))) as trusting:
            client = openai.OpenAI(
                base_url=f"{cluster.gateway_url}/v1",
                api_key=API_KEY,
                max_retries=0,
                http_client=trusting,  # type: ignore[arg-type]
            )
            reply = client.chat.completions.create(
                model="sealed", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert reply.choices[0].message.content
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA
            httpx.get(f"{cluster.gateway_url}/health")
        plain = cluster.gateway_url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on a TLS port
            httpx.get(f"{plain}/health").raise_for_status()
    finally:
        cluster.stop()


# -- last: every secret the tests above used, looked for everywhere ------------------------


def test_no_secret_in_any_log_metrics_page_or_ps_listing(secured: Secured) -> None:
    cluster = secured.cluster
    for _ in range(3):  # traffic with the client key, on top of the tests above
        secured.gateway().chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    secrets = {"API key": API_KEY, "cluster token": secured.token}
    for worker in cluster.routes().workers:
        assert worker.engine_secret
        secrets[f"engine secret of {worker.worker_id}"] = worker.engine_secret
    pages = {
        "gateway /metrics": httpx.get(f"{cluster.gateway_url}/metrics").text,
        "controller /metrics": httpx.get(f"{cluster.controller_url}/metrics").text,
        "worker /metrics": httpx.get(f"{secured.status_url}/metrics").text,
        "ps": subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout,
    }
    for path in LOG_DIR.rglob("*"):
        if path.is_file() and "secrets" not in path.parts:
            pages[str(path)] = path.read_text(errors="replace")
    assert len(pages) > 5 and "vllm:num_requests_running" in pages["worker /metrics"]
    for where, text in pages.items():
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} is in {where}"
