"""The supervisor of a dashboard launch: `python -m dashboard.supervise RC_PATH -- CMD...`.

Standard library only, so it starts in milliseconds. It runs CMD, passes SIGTERM/SIGINT on to it, and writes CMD's
exit status to RC_PATH however CMD ended, so the Launch page can always say how a launch finished.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}


def supervise(rc_path: Path, cmd: list[str]) -> int:
    """Run `cmd` in its own process group, pass SIGTERM/SIGINT on to that group once (it decides how to close),
    turn SIGUSR1 into SIGKILL for it (Kill now), and write its exit status to `rc_path` (128 + signal number when a
    signal ended it, as a shell reports it). Started with these signals blocked: a Stop that came before the
    handlers are in place is delivered when they are unblocked here, and still reaches the command."""
    pending: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum, frame) -> None:
        pending.append(signum)
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL if signum == signal.SIGUSR1 else signum)

    for sig in SIGNALS:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # a pending Stop lands here
    if pending:  # stopped before the command started: it never runs
        code = 128 + (signal.SIGKILL if pending[0] == signal.SIGUSR1 else pending[0])
    else:
        # Its own group: the command (and what it starts) gets each signal once, from here.
        child = subprocess.Popen(cmd, start_new_session=True)
        if pending:  # a Stop between the check and the start
            forward(pending.pop(), None)
        code = child.wait()
        code = 128 - code if code < 0 else code
    tmp = rc_path.with_suffix(".rc.tmp")
    tmp.write_text(str(code))
    tmp.replace(rc_path)  # atomic: a reader sees no status or the whole status
    return code

if __name__ == "__main__":
    sep = sys.argv.index("--")
    sys.exit(supervise(Path(sys.argv[1]), sys.argv[sep + 1 :]))
