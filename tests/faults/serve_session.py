"""`llmpress serve` for the process-kill tests: the restart tests' ``Serve``, started in a session of its own so
that the service and everything it starts (its local Ray: GCS, raylet, agents, workers) can be found, killed and
checked gone by session id, and with its local Ray on 127.0.0.1.

Ray's workers each take a process group of their own, so a kill of the serve process group reaches the serve
process, GCS, raylet and agents but not the workers; they all stay in the session, so ``kill`` reaches them too.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


from tests.api.test_service_restart import Serve

class ServeSession(Serve):
    """``Serve`` as a session leader (its pid is the session id of all it starts); up when /readyz answers ready.
    Its local Ray is on 127.0.0.1 as every Ray of the tests is (tests/conftest.py sets the variable it reads)."""

    def __init__(self, root: Path, port: int = 0, timeout: float = 120.0):
        super().__init__(root, port, timeout=timeout, new_session=True)

    @property
    def sid(self) -> int:
        return self.proc.pid

    def processes(self) -> dict[int, str]:
        """The live processes of the session: pid -> command line (as Ray's workers retitle themselves)."""
        return session_processes(self.sid)

    def kill(self, timeout: float = 30.0) -> dict[int, str]:
        """SIGKILL to the serve process group and then to every other process of the session (Ray's workers, in
        groups of their own), as when the service's machine goes down; then what of the session outlived it (see
        ``reap``). Left alone, a worker would go on for a second or two until it sees its raylet gone, and could
        finish the job meanwhile."""
        if self.proc.poll() is None:  # not yet reaped, so its pid (the group's id) cannot name anyone else's
            os.killpg(self.sid, signal.SIGKILL)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout)
        if not self.log.closed:
            self.log.close()
        return self.reap(timeout)

    def stop(self) -> bool:
        """SIGTERM as ``Serve.stop``: whether the service shut down cleanly and took all of its session along."""
        clean = super().stop()
        return not self.reap() and clean

    def reap(self, timeout: float = 30.0) -> dict[int, str]:
        """The processes of the session still alive ``timeout`` seconds from now (empty as soon as none is), each
        then killed by pid so that none outlives the test."""
        deadline = time.monotonic() + timeout
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


def session_processes(sid: int) -> dict[int, str]:
    """The processes of session ``sid`` that are alive (zombies count as gone): pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        # Fields after the parenthesised command name: state ppid pgrp session ...
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state not in ("Z", "X"):
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def alive(pids) -> list[int]:
    """Those of ``pids`` that still exist and are not zombies, in whatever session."""
    found = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append(pid)
    return found
