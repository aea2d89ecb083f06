"""Child processes never outlive whoever started them."""

from __future__ import annotations

import os
import signal
import sys

from fleetserve import procs
from tests.helpers import alive, descendants, wait_until


def test_a_sigkilled_reaper_still_takes_its_command_down() -> None:
    reaper = procs.spawn_tree([sys.executable, "-c", "import time; time.sleep(300)"])
    child = wait_until(lambda: descendants(reaper.pid), 10, "the reaper's child")[0]
    os.kill(reaper.pid, signal.SIGKILL)  # no chance to clean up: the death signal must
    reaper.wait()
    wait_until(lambda: not alive(child), 10, "the orphaned command to stop")


def test_children_get_their_own_group_in_our_session() -> None:
    """Own process group: a terminal's Ctrl-C (sent to the foreground group) misses them.
    Our session: Linux shares the CPU between sessions first, and an engine in a session of
    its own was measured starving the gateway and clients for a whole generation."""
    child = procs.spawn([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
        assert os.getsid(child.pid) == os.getsid(0)
    finally:
        procs.stop(child)
