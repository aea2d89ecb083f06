"""The chat page the gateway serves at /, driven in Debian's chromium (headless, Playwright).

Two fake models behind a real gateway: a fast one and a slow one (20 tokens/s)
whose long answer is stopped from the page.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import module_log_dir
from tests.helpers import LocalCluster, wait_until

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (scripts/setup.sh --dev installs it)"
)
LOG_DIR = module_log_dir("test_chat_page")


@pytest.fixture(scope="module")
def cluster(fleet_env: dict[str, str]) -> Iterator[LocalCluster]:
    c = LocalCluster(LOG_DIR, fleet_env)
    c.add_worker("fast", "fake")
    c.add_worker("slow", "fake", engine_args=("--tokens-per-s", "20"))
    c.wait_workers("fast", 1, timeout_s=30)
    c.wait_workers("slow", 1, timeout_s=30)
    yield c
    c.close()


def engine_running(cluster: LocalCluster, model: str) -> int:
    (worker,) = [w for w in cluster.table().workers if model in w.model_names]
    metrics = httpx.get(worker.base_url.removesuffix("/v1") + "/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith("vllm:num_requests_running"))
    return int(float(line.split()[-1]))


def test_chat_stream_stop_and_switch_models(cluster: LocalCluster) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(cluster.gateway_url + "/")
            expect(page.locator("#model option")).to_have_count(2)

            # a short answer from the fast model, streamed into the page, with its figures
            page.select_option("#model", "fast")
            page.fill("#max-tokens", "8")
            page.fill("#prompt", "hello")
            page.click("#send")
            first = page.locator(".assistant").nth(0)
            expect(first).to_contain_text("tok7", timeout=15_000)
            expect(first.locator(".stats")).to_contain_text("fast · first token")
            expect(first.locator(".stats")).to_contain_text("tokens/s · 8 tokens")

            # switch to the slow model; stop its long answer half way
            page.select_option("#model", "slow")
            page.fill("#max-tokens", "400")
            page.fill("#prompt", "tell me a long story")
            page.press("#prompt", "Enter")
            second = page.locator(".assistant").nth(1)
            expect(second).to_contain_text("tok3", timeout=15_000)  # streaming, not at the end
            assert engine_running(cluster, "slow") == 1
            page.click("#stop")
            expect(second.locator(".stats")).to_contain_text("stopped · slow")
            assert "tok399" not in second.inner_text()
            # closing the stream reached the engine: it stopped generating
            wait_until(lambda: engine_running(cluster, "slow") == 0, 10, "the engine to abort")
            expect(page.locator("#send")).to_be_enabled()
            page.screenshot(path=str(LOG_DIR / "chat-page.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []


def test_a_gateway_with_keys_asks_for_one(cluster: LocalCluster) -> None:
    from playwright.sync_api import expect, sync_playwright

    from gateway.auth import hash_key

    keys = LOG_DIR / "keys.yaml"
    keys.write_text(f"keys: [{{name: me, key_sha256: {hash_key('sk-page')}, models: [fast]}}]\n")
    with (
        cluster.extra_gateway("keyed", "--keys-file", str(keys)) as (_, url),
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url.removesuffix("/v1") + "/")
            expect(page.locator("#status")).to_contain_text("API key")  # the 401's message
            expect(page.locator("#model option")).to_have_count(0)
            page.fill("#api-key", "sk-page")
            page.dispatch_event("#api-key", "change")
            expect(page.locator("#model option")).to_have_count(1)  # the key sees `fast` only
            page.fill("#max-tokens", "4")
            page.fill("#prompt", "hi")
            page.click("#send")
            expect(page.locator(".assistant").first).to_contain_text("tok3")
        finally:
            browser.close()
