"""A Ray worker setup hook: the first method job any worker starts kills its process (as a lost node
would), once; the restarted worker runs it again. ``MARKER`` names the file that says it happened."""

import os

MARKER = os.environ["MERGEBENCH_TEST_MARKER"]


def install() -> None:
    from mergebench.runner import sweep

    original = sweep.SuiteSweep.method

    def method(self, *args, **kwargs):
        try:
            descriptor = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return original(self, *args, **kwargs)
        os.close(descriptor)
        os._exit(1)

    sweep.SuiteSweep.method = method
