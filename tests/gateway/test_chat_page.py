"""The chat page the gateway serves at /, driven in Debian's chromium (headless, Playwright).

Two fake models behind a real gateway: a fast one and a slow one (20 tokens/s)
whose long answer is stopped from the page.
"""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import module_log_dir
from tests.helpers import LocalCluster, wait_until

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="needs Debian's chromium (scripts/setup.sh --dev installs it)"
    ),
]
LOG_DIR = module_log_dir("test_chat_page")


def test_chat_stream_stop_and_switch_models(fast_and_slow: LocalCluster) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # (5 s by default) a busy CI machine stalls chromium too

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(fast_and_slow.gateway_url + "/")
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
            assert fast_and_slow.engine_metric("slow", "vllm:num_requests_running") == 1
            page.click("#stop")
            expect(second.locator(".stats")).to_contain_text("stopped · slow")
            assert "tok399" not in second.inner_text()
            # closing the stream reached the engine: it stopped generating
            wait_until(
                lambda: fast_and_slow.engine_metric("slow", "vllm:num_requests_running") == 0,
                10,
                "the engine to abort",
            )
            expect(page.locator("#send")).to_be_enabled()
            page.screenshot(path=str(LOG_DIR / "chat-page.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []


def test_a_gateway_with_keys_asks_for_one(fast_and_slow: LocalCluster) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # (5 s by default) a busy CI machine stalls chromium too

    from gateway.auth import hash_key

    keys = LOG_DIR / "keys.yaml"
    keys.write_text(f"keys: [{{name: me, key_sha256: {hash_key('sk-page')}, models: [fast]}}]\n")
    with (
        fast_and_slow.extra_gateway("keyed", "--keys-file", str(keys)) as (_, url),
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
