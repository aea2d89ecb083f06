"""`fleetserve chat` in a pseudo-terminal and `fleetserve bench`, against a real gateway."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pexpect

from tests.conftest import module_log_dir
from tests.helpers import LocalCluster, wait_until

LOG_DIR = module_log_dir("test_chat_and_bench")


def test_terminal_chat_streams_switches_and_stops(fast_and_slow: LocalCluster) -> None:
    url = f"{fast_and_slow.gateway_url}/v1"
    chat = pexpect.spawn(
        sys.executable,
        ["-m", "fleetserve.cli", "chat", "--url", url, "--model", "fast", "--max-tokens", "200"],
        env={**fast_and_slow.env, "NO_COLOR": "1", "TERM": "dumb"},
        encoding="utf-8",
        timeout=20,
    )
    chat.logfile_read = (LOG_DIR / "chat.log").open("w")
    try:
        chat.expect_exact("fast> ")
        chat.sendline("hello")
        chat.expect_exact("tok199")
        chat.expect(r"first token \d+ ms, 200 chunks")
        chat.expect_exact("fast> ")
        chat.sendline("/model nope")
        chat.expect_exact("no model 'nope'; served: fast, slow")
        chat.sendline("/model slow")
        chat.expect_exact("now talking to slow")
        chat.sendline("a long story please")
        chat.expect_exact("tok3")  # streaming: 200 tokens at 20/s take 10 s
        chat.sendintr()  # Ctrl-C stops the answer, not the chat
        chat.expect_exact("(stopped; ")
        chat.expect_exact("slow> ")
        wait_until(
            lambda: fast_and_slow.engine_metric("slow", "vllm:num_requests_running") == 0,
            10,
            "the slow engine to stop generating",
        )
        chat.sendline("/exit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0


def run_bench(cluster: LocalCluster, out_dir: Path, *args: str) -> tuple[str, dict]:
    import subprocess

    url = f"{cluster.gateway_url}/v1"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetserve.cli",
            "bench",
            "--url",
            url,
            "--out-dir",
            str(out_dir),
            *args,
        ],
        env={**cluster.env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = out_dir.glob("bench-*.json")
    return done.stdout, json.loads(report.read_text())


def test_bench_sweeps_concurrency_and_reports_what_was_sent(
    fast_and_slow: LocalCluster, tmp_path: Path
) -> None:
    before = fast_and_slow.engine_metric("fast", "vllm:generation_tokens_total")
    requests_before = fast_and_slow.engine_metric("fast", "vllm:request_success_total")
    fixed = ["--output-len", "16", "--len-spread", "0"]
    out, report = run_bench(
        fast_and_slow,
        tmp_path,
        "--model",
        "fast",
        "--concurrency",
        "1,4",
        "--num-prompts",
        "20",
        *fixed,
    )
    assert "concurrency 1" in out and "concurrency 4" in out and "TTFT p50/p90/p99 ms" in out
    levels = report["levels"]
    assert [(lv["mode"], lv["level"], lv["requests"], lv["errors"]) for lv in levels] == [
        ("concurrency", 1.0, 20, 0),
        ("concurrency", 4.0, 20, 0),
    ]
    assert all(r["output_tokens"] == 16 for lv in levels for r in lv["results"])
    # the engine saw exactly what the bench says it sent
    assert fast_and_slow.engine_metric("fast", "vllm:request_success_total") - requests_before == 40
    sent_tokens = sum(r["output_tokens"] for lv in levels for r in lv["results"])
    assert sent_tokens == 640
    assert fast_and_slow.engine_metric("fast", "vllm:generation_tokens_total") - before == 640
    assert all(lv["ttft_ms"]["p50"] <= lv["latency_ms"]["p50"] for lv in levels)
    (png,) = tmp_path.glob("bench-*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_at_a_request_rate_from_a_prompts_file(
    fast_and_slow: LocalCluster, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "hello", "max_tokens": 5}\n'
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}\n'
    )
    rate = ["--request-rate", "40", "--prompts", str(prompts), "--num-prompts", "6"]
    _, report = run_bench(fast_and_slow, tmp_path / "out", *rate)  # no --model: the first listed
    (level,) = report["levels"]
    assert (level["mode"], level["requests"], level["errors"]) == ("rate", 6, 0)
    assert sorted(r["output_tokens"] for r in level["results"]) == [5, 5, 5, 7, 7, 7]
    assert report["model"] == "fast"
