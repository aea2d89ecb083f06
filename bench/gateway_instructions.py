"""What one request costs the gateway in machine instructions (valgrind's callgrind): a
measure of a hot-path change that other work on the machine does not move.

Requests per second on a shared 2-core machine move by tens of percent from run to run
(bench/gateway_overhead.py: compare its ratios within one run); the instructions the
gateway executes per request move by about 1% (its background polls). The gateway runs
under callgrind with instrumentation off until the load is warm, then counts exactly
``--requests`` sequential 16-token chat completions, streamed and not, through one fake
worker paced at 200 tokens/s (so that each token is one chunk, however slow the
instrumented gateway).

    .venv/bin/python bench/gateway_instructions.py
    .venv/bin/python bench/gateway_instructions.py -- --max-resumes 0      # gateway flags
    git archive main | tar -x -C /tmp/main                                 # today's code...
    .venv/bin/python bench/gateway_instructions.py --checkout /tmp/main    # ...against yours

Needs valgrind (apt: valgrind).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from controller.settings import ControllerSettings
from fleetserve.cli.args import settings_argv
from fleetserve.cli.harness import Cluster, Component, free_port
from gateway.settings import GatewaySettings
from workers.settings import WorkerSettings

MODEL = "bench-model"
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say something."}],
    "max_tokens": 16,
}


def callgrind(gateway: Component, *command: str) -> None:
    subprocess.run(
        ["callgrind_control", *command, str(gateway.pid)], check=True, capture_output=True
    )


def measure(cluster: Cluster, gateway: Component, out: Path, requests: int) -> dict[str, float]:
    """Instructions per request, by mode (callgrind dumps to ``out``.N)."""
    per_request = {}
    with httpx.Client(base_url=cluster.gateway_url, timeout=60) as client:
        for mode, stream in (("stream", True), ("nonstream", False)):
            body = {**BODY, "stream": stream}
            for _ in range(30):  # uninstrumented: connections, caches, the routing table
                client.post("/v1/chat/completions", json=body).read()
            callgrind(gateway, "--instr=on")
            for _ in range(10):  # the instrumented code warm
                client.post("/v1/chat/completions", json=body).read()
            callgrind(gateway, "--zero")
            for _ in range(requests):
                response = client.post("/v1/chat/completions", json=body)
                response.read()
                assert response.status_code == 200, response.text
            callgrind(gateway, "--dump=" + mode)
            callgrind(gateway, "--instr=off")
    for dump in sorted(out.parent.glob(out.name + ".*")):
        text = dump.read_text()
        mode = re.search(r"^desc: Trigger: .*?(\w+)$", text, re.M)
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if mode and total:
            per_request[mode.group(1)] = int(total.group(1)) / requests
    return per_request


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200, help="Counted requests per mode.")
    parser.add_argument(
        "--checkout",
        type=Path,
        help="Run controller, gateway and worker from this source tree (another version).",
    )
    parser.add_argument("gateway_flags", nargs="*", help="After --: flags for the gateway.")
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="fleetserve-bench-") as tmp:
        log_dir = Path(tmp)
        # an instrumented gateway is slow, and so is a busy machine: no worker may expire
        controller = ControllerSettings(
            host="127.0.0.1", port=free_port("127.0.0.1"), expiry_after_s=20
        )
        gateway_settings = GatewaySettings(host="127.0.0.1", port=free_port("127.0.0.1"))
        env = {}
        if args.checkout:  # `python -m` puts the working directory first on sys.path
            env["PYTHONPATH"] = str(args.checkout.resolve())
            os.chdir(args.checkout)
        cluster = Cluster(log_dir, controller, gateway_settings, env, log_level="WARNING")
        try:
            cluster.start_controller()
            out = log_dir / "callgrind.out"
            wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
            argv = ["gateway", *settings_argv(gateway_settings), *args.gateway_flags]
            gateway = Component(
                "gateway", argv, log_dir, env, wrapper=[*wrapper, f"--callgrind-out-file={out}"]
            )
            cluster.components.append(gateway)
            worker = WorkerSettings(
                engine="fake", served_name=MODEL, engine_args=["--tokens-per-s", "200"]
            )
            cluster.add_replica(worker, "worker")
            gateway.wait_http(f"{cluster.gateway_url}/health", timeout_s=600)
            cluster.wait_routed(MODEL, 1, timeout_s=600)
            result = measure(cluster, gateway, out, args.requests)
        finally:
            cluster.stop()
    flags = " ".join(args.gateway_flags) or "default flags"
    if args.checkout:
        flags += f", {args.checkout}"
    for mode, instructions in result.items():
        print(f"{mode}: {instructions / 1000:.0f}k instructions per request ({flags})")


if __name__ == "__main__":
    main()
