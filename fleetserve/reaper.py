"""Run a command and take its whole process group down with it.

``python -m fleetserve.reaper CMD...`` starts CMD in a process group of its
own and then: on SIGTERM (or its parent's death, see procs.spawn) it SIGTERMs
the group, waits, and SIGKILLs what is left; on SIGINT it SIGKILLs the group at
once; when CMD exits on its own it kills CMD's leftover children too, and
exits with CMD's code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from fleetserve import constants, procs


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: python -m fleetserve.reaper CMD [ARGS...]", file=sys.stderr)
        return 2
    # The parent-death signal covers the reaper itself being SIGKILLed: CMD gets SIGTERM and
    # stops its own children (vLLM's API server its EngineCore) instead of running on orphaned.
    death_signal = procs.die_with_parent if sys.platform == "linux" else None
    child = subprocess.Popen(sys.argv[1:], process_group=0, preexec_fn=death_signal)
    stop_requested_at: float | None = None

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested_at
        if stop_requested_at is None:
            stop_requested_at = time.monotonic()
            _kill_group(child.pid, signal.SIGTERM)

    def kill_now(signum: int, _frame: object) -> None:
        _kill_group(child.pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, kill_now)
    if os.getppid() == 1:  # the parent died before the death signal was armed
        request_stop(signal.SIGTERM, None)
    while True:
        try:
            code = child.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if (
                stop_requested_at is not None
                and time.monotonic() - stop_requested_at > constants.ENGINE_STOP_GRACE_S
            ):
                _kill_group(child.pid, signal.SIGKILL)
    _kill_group(child.pid, signal.SIGKILL)  # e.g. vLLM's EngineCore after its API server died
    return code


if __name__ == "__main__":
    sys.exit(main())
