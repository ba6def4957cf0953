"""`accelerate launch [--config_file accelerate_configs/X.yaml] -m grace_hf.train --config recipe.yaml`.

The same as `grace-hf train`: a launcher needs a module to run, and this is it.
"""

import sys

from grace_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
