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
