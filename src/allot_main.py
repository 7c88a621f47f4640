"""The `allot` command's entry point, kept outside the allot package on purpose.

Importing allot imports torch, which takes seconds; an interrupt (Ctrl-C) in that time must end in
one line too, not in Python's traceback, so the import happens here, inside a handler, before
`allot.cli.main` takes over (which handles interrupts, errors and exit codes from then on).
"""

import sys


def main() -> int:
    """Run the `allot` command; exit code 130 when interrupted while starting up."""
    try:
        from allot.cli import main as run
    except KeyboardInterrupt:
        print("allot: interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
