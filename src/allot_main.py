"""The `allot` command's entry point, kept outside the allot package on purpose.

Importing allot imports torch, which takes seconds; an interrupt (Ctrl-C) in that time must end in
one line too, not in Python's traceback, so the import happens here, inside a handler, before
`allot.cli.main` takes over (which handles interrupts, errors and exit codes from then on).
"""

import os
import signal
import sys
from typing import NoReturn


def leave(code: int) -> NoReturn:
    """Exit with `code`. After an interrupt (130) the process leaves at once: when the
    KeyboardInterrupt was raised inside code an extension ran through `PyRun_*` (torch does while
    it is imported), Python would otherwise end by killing itself with SIGINT at shutdown,
    replacing exit code 130 by a death by signal. Nothing is left to clean up by then: outputs
    not yet complete were removed as the interrupt passed. Any other code is final once the
    command has returned: later interrupts are ignored."""
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    # The command is done and has said so: an interrupt from here on (while the interpreter shuts
    # down, which takes a while after torch) would turn its exit code into a death by SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


def main() -> int:
    """Run the `allot` command; exit code 130 when interrupted while starting up.

    An interrupt while allot (and torch, numpy, scipy) are being imported waits until the import
    is done: cut in the middle, an extension module's import can leave it half loaded, and the
    next import of it then fails with an ImportError instead of the interrupt. A second
    interrupt does not wait."""
    received: list[int] = []

    def hold(number: int, _frame: object) -> None:
        received.append(number)
        if len(received) > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, hold)
    try:
        from allot.cli import main as run
    except BaseException:
        if not received:
            raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        print("allot: interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    return run()


def entry() -> NoReturn:
    """The console script: `main`, then `leave` with its exit code (130, with the one line, for
    an interrupt landing between the command's end and `leave`)."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("allot: interrupted", file=sys.stderr)
        code = 130
    leave(code)


if __name__ == "__main__":
    entry()
