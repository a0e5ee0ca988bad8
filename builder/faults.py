"""A test-only fault hook: stop a process at a named stage, so a test can kill it there.

The reliability tests (``tests/reliability/test_crashes.py``) ``kill -9`` a real imc
process at each stage of a cache build and of gc, then check that the next process
recovers. Sleeping and hoping the process got far enough is flaky; instead the library
calls ``checkpoint(stage)`` at its stage boundaries:

    stage          where
    pulled         caches: every blob of every image is local and pinned
    flash-ready    caches: a flash cache was recorded Ready (served from staging)
    packing        caches: the volume is about to be packed
    pack-midway    volume.pack: some blobs, not all, are written to the partial file
    export-midway  export: some blobs, not all, are written to the archive
    switched       caches: the record points at the new volume; older ones not yet removed
    gc-locked      store.gc: the exclusive gc lock is held, nothing removed yet

When the environment variable ``IMC_TEST_PAUSE_AT`` equals the stage, ``checkpoint``
writes the stage name to the file named by ``IMC_TEST_PAUSE_FILE`` (atomically, so the
test sees the whole name or nothing) and blocks, holding whatever locks and files the
process holds at that point, until the process is killed (after an hour it exits with
status 70, so a process orphaned by a dead test run does not stay forever). Without
the variable, it costs one environment lookup and does nothing.
"""

from __future__ import annotations

import os
import threading

PAUSE_AT = "IMC_TEST_PAUSE_AT"
PAUSE_FILE = "IMC_TEST_PAUSE_FILE"
_LIMIT = 3600.0


def checkpoint(stage: str) -> None:
    """Pause here forever if the test environment asks for ``stage`` (see above)."""
    if os.environ.get(PAUSE_AT) != stage:
        return
    target = os.environ.get(PAUSE_FILE)
    if target:
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(stage)
        os.replace(tmp, target)
    threading.Event().wait(_LIMIT)
    os._exit(70)
