"""Run a command and report its wall time, CPU time and peak RSS as JSON on the last stderr line.

A separate small process because Linux carries a process's peak RSS across exec: a
command started straight from the (large) benchmark process would report at least
the benchmark's own memory. Forked from this small process, it reports its own.
"""

import json
import os
import sys
import time

argv = sys.argv[1:]
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
elapsed = time.perf_counter() - started
print(json.dumps({"seconds": elapsed, "cpu_seconds": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss}),
      file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
