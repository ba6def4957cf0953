"""`python -m grace_hf <command> ...` (and `accelerate launch -m grace_hf <command> ...`): the `grace-hf` CLI."""

import sys

from grace_hf.commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
