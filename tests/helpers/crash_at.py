"""Run the command line, killing the process (SIGKILL, as ``kill -9``) at the Nth call of one step.

    python tests/helpers/crash_at.py STEP N mergebench-arguments...

Steps: ``build`` (fine-tuning an expert), ``merge`` (a method computing a merged task vector),
``evaluate`` (scoring a model on a split), ``report`` (half-way through writing a report file). A step
written ``interrupt:STEP`` sends SIGINT (Ctrl-C) there instead.
"""

import os
import signal
import sys


SIGNAL = signal.SIGKILL


def kill() -> None:
    os.kill(os.getpid(), SIGNAL)


def on_call(owner, name: str, count: int, before=None) -> None:
    original = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == count:
            if before is not None:
                before(*args, **kwargs)
            kill()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def half_written(path, text):
    """Start writing the report as the real writer does, then die with half of it on disk."""
    from mergebench.core.atomic import atomic_path

    with atomic_path(path) as partial:
        partial.write_text(text[: len(text) // 2], encoding="utf-8")
        kill()


if __name__ == "__main__":
    step, count, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if step.startswith("interrupt:"):
        step, SIGNAL = step.removeprefix("interrupt:"), signal.SIGINT
    if step == "build":
        from mergebench.runner.kinds import trained

        on_call(trained, "finetune", count)
    elif step == "merge":
        from mergebench.methods.registry import MergeMethod

        on_call(MergeMethod, "merged_vector", count)
    elif step == "evaluate":
        from mergebench.runner.prepared import PreparedSuite

        on_call(PreparedSuite, "evaluate", count)
    elif step == "report":
        from mergebench.reports import tables

        on_call(tables, "write_text", count, before=half_written)
    else:
        raise SystemExit(f"unknown step {step!r}")
    from mergebench import cli

    sys.exit(cli.main(argv))
