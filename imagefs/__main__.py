"""`python -m imagefs`: the CLI, ended without the interpreter's finalisation.

Tearing down the modules a run or a mount server loads (trio, the launcher, the read path) takes
~15 ms, and `imagefs run` waits for that twice: for its mount server, and for itself. By the time
main() returns, everything that must be done is: its files are closed, logging is shut down, worker
threads are daemon threads that nobody waits for anyway. So flush the standard streams and leave.
"""

import os
import sys

from imagefs.cli import main

code = main()
try:
    sys.stdout.flush()
    sys.stderr.flush()
except OSError:   # e.g. `imagefs ps | head`: the reader is gone; Python's own exit says 120 then
    code = 120
os._exit(code)
