"""Launch ``dagster dev`` with SIGINT restored, so ``kill -INT`` (Ctrl-C) stops it cleanly.

A process started in the background of a non-interactive shell inherits SIGINT as *ignored*;
``dagster dev`` then never sees the interrupt it uses to shut down its webserver, daemon and code
server (SIGTERM did not stop it within a minute either). This launcher resets SIGINT to the
default handler and execs the Dagster CLI in the same process, so the pid stays the same.

Usage: ``python -m asr_assets_tests._dagster_dev dev -w workspace.yaml -h 127.0.0.1 -p 3300``
(the arguments are passed to ``dagster`` unchanged).
"""

import os
import signal
import sys


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # not ignored -> Python installs KeyboardInterrupt after exec
    os.execv(sys.executable, [sys.executable, "-m", "dagster", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
