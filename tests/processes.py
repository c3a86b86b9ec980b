"""Real processes in the fault tests: kill one at a chosen moment."""
from __future__ import annotations

import signal
import subprocess
import time
from typing import Callable


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], *, seconds: float = 600,
              output: Callable[[], str] = lambda: "") -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds, and reap it. Fails when the process
    ends first (``output()`` says why) or ``ready()`` does not hold within ``seconds``; a
    process left running by a failure is killed too."""
    deadline = time.monotonic() + seconds
    try:
        while not ready():
            assert proc.poll() is None, "the process ended before it could be killed:\n" + output()
            assert time.monotonic() < deadline, f"not ready to be killed within {seconds:g} s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
