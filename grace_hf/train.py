"""`accelerate launch -m grace_hf.train --config recipe.yaml`: the older spelling of
`accelerate launch -m grace_hf train --config recipe.yaml`, kept working."""

import sys

from grace_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
