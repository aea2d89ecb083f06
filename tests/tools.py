"""External tools some tests need (promtool, prometheus, kubectl), installed by setup.

A missing tool fails the test with what to run, rather than skipping it
silently; the one exception is a machine where setup could not have installed
it (not root, no sudo), where the test is skipped and says why.
"""

from __future__ import annotations

import os
import shutil

import pytest

SETUP_HINT = {
    "promtool": "scripts/setup.sh --dev installs Debian's `prometheus` package (promtool in it)",
    "prometheus": "scripts/setup.sh --dev installs Debian's `prometheus` package",
    "kubectl": "install kubectl (1.27 or newer, for `kubectl kustomize`)",
}


def require_tool(name: str) -> str:
    """The tool's path; fails (or, where it cannot be installed here, skips) without it."""
    path = shutil.which(name) or (
        f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None
    )
    if path:
        return path
    hint = SETUP_HINT.get(name, f"install {name}")
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        pytest.skip(f"{name} not found and this user cannot install packages: {hint}")
    pytest.fail(f"{name} not found: {hint}", pytrace=False)
