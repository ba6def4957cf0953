"""The `grace-hf` commands: one module per command, each a `main(argv) -> int` that parses its flags and calls the
library. Argument parsing lives here only (the training recipe parser aside)."""
