"""One module per `grace-hf` command: `main(argv: list[str] | None = None) -> int`; argparse lives only here."""
