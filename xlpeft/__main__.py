"""Entry point of the ``xlpeft`` command (and ``python -m xlpeft``).

It sets CPU thread defaults *before* torch starts, because OpenMP reads them
once at start-up: ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep
instead of spinning; on a machine with other load, spinning made 2-thread
steps 3–7× slower) and ``OMP_NUM_THREADS`` = the CPUs this process may use.
Values already in the environment win.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def thread_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set ``OMP_WAIT_POLICY`` and ``OMP_NUM_THREADS`` where unset; return what was set."""
    env = os.environ if environ is None else environ
    chosen = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(usable_cpus())}
    applied = {k: v for k, v in chosen.items() if not env.get(k)}
    env.update(applied)
    return applied


def main(argv: list[str] | None = None) -> None:
    """``xlpeft`` command: thread defaults, then the CLI (imports torch)."""
    thread_defaults()
    from xlpeft.lightning.cli import main as cli_main

    cli_main(argv)


if __name__ == "__main__":
    main()
