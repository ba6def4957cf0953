"""One command-line convention: every command answers `--help`, and every flag is kebab-case (`train` also lists
the snake_case spelling of its recipe keys, after the kebab-case one)."""

import re

import pytest

from grace_hf.commands import cli
from grace_hf.training.args import build_parser


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_uses_kebab_case_flags(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: grace-hf {command}")
    flags = set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", text))
    snake = {flag for flag in flags if "_" in flag}
    if command in ("train", "add-images"):  # each recipe key's own spelling follows its kebab-case flag
        assert all(flag.replace("_", "-") in flags for flag in snake)
        assert "--output-dir OUTPUT_DIR, --output_dir OUTPUT_DIR" in text
    else:
        assert not snake, f"grace-hf {command}: snake_case flags {sorted(snake)}"


def test_usage_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"  {command} " in usage for command in cli.COMMANDS)
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_train_parser_shows_the_recipe_keys():
    options = {option for action in build_parser()._actions for option in action.option_strings}
    assert {"--model", "--data", "--output-dir", "--output_dir", "--resume-from-checkpoint", "--overwrite"} <= options
