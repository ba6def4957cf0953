"""The `grace-hf` script's entry point: `grace_hf.commands.cli.main`, with Ctrl-C handled from the first moment.

Importing `grace_hf` loads torch and transformers (seconds), before any of its code could catch an interrupt; this
module lives beside the package so that it can: Ctrl-C then is one line on stderr and exit status 130, as it is in a
command (`python -m grace_hf` imports the package first and cannot).
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # the shell's status of a command ended by Ctrl-C (128 + SIGINT)


def main() -> int:
    """Import the CLI and run it (`grace_hf.commands.cli.main`); an interrupt while importing ends in one line."""
    try:
        from grace_hf.commands.cli import main as run
    except KeyboardInterrupt:
        print("grace-hf: interrupted", file=sys.stderr)
        return INTERRUPTED
    return run()


if __name__ == "__main__":
    sys.exit(main())
