"""Child processes that cannot outlive their parent.

Every process fleetserve starts gets its own process group (a Ctrl-C in the
terminal reaches only the parent, which then stops its children in order) and,
on Linux, a parent-death signal (a parent killed with SIGKILL still takes its
children down).

A process group, not a session: Linux's scheduler shares the CPU fairly between
sessions first (autogroup), and an engine busy on every core in a session of its
own was measured starving the rest of the cluster (the gateway, the controller,
clients) of CPU for the whole of a long generation (15-18 s on 2 cores). In the
parent's session, every process gets its fair share.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

from fleetserve import constants

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM us when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a process group of its own, bound to this process's life."""
    return subprocess.Popen(
        list(cmd),
        env=dict(env) if env is not None else None,
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        process_group=0,
        preexec_fn=die_with_parent if sys.platform == "linux" else None,
    )


def spawn_tree(cmd: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
    """``spawn`` under ``fleetserve.reaper``, which takes the whole process tree down.

    For engines: vLLM's API server leaves its EngineCore process running if it
    is killed with SIGKILL; the reaper kills the engine's process group.
    """
    return spawn([sys.executable, "-m", "fleetserve.reaper", *cmd], **options)


def stop(
    proc: subprocess.Popen[bytes],
    grace_s: float = constants.STOP_GRACE_S,
    signalled: bool = False,
) -> int:
    """SIGTERM (unless already ``signalled``), wait up to ``grace_s``, then SIGKILL.

    Returns the exit code. A second SIGTERM would mean "hurry" to a fleetserve
    process, so it is sent once only.
    """
    if proc.poll() is None:
        if not signalled:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
