"""-q and -v on every command: -q leaves errors and the JSON, -v adds detail, --json is the same under both."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from icdcli.cli.console import console_options
from icdcli.cli.main import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROMPTS = ["--src", "a red circle on a blue background", "--tgt", "a yellow circle on a blue background"]


def _icd(*args: object) -> click.testing.Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def _commands(group: click.Group = main, path: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


@pytest.mark.parametrize("path", [(), *(path for path, _ in _commands())], ids=lambda path: "-".join(path) or "icd")
def test_every_command_takes_quiet_and_verbose(path):
    command = main
    for name in path:
        command = command.commands[name]
    flags = {opt for param in command.params for opt in param.opts}
    assert {"-q", "--quiet", "-v", "--verbose"} <= flags
    for flag in ("-q", "-v"):
        result = _icd(*path, flag, "--help")
        assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_quiet_leaves_edit_and_invert_silent_and_keeps_their_errors(tmp_path):
    edited = _icd("edit", EXAMPLES / "red-circle.png", *PROMPTS, "-o", tmp_path / "edit.png")
    assert edited.exit_code == 0 and "wrote " in edited.stderr, edited.output  # the human lines -q removes
    for flags in (["-q"], ["--quiet"]):
        quiet = _icd("edit", EXAMPLES / "red-circle.png", *PROMPTS, "-o", tmp_path / "quiet.png", "--overwrite", *flags)
        assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == "", quiet.output
    assert (tmp_path / "quiet.png").is_file()
    grouped = CliRunner().invoke(main, ["-q", "edit", str(EXAMPLES / "red-circle.png"), *PROMPTS, "-o",
                                        str(tmp_path / "quiet.png"), "--overwrite"])  # fmt: skip
    assert grouped.exit_code == 0 and grouped.output == "", grouped.output
    inverted = _icd("invert", EXAMPLES / "red-circle.png", "--prompt", "a red circle on a blue background", "-o",
                    tmp_path / "circle.latent.safetensors", "-q")  # fmt: skip
    assert inverted.exit_code == 0 and inverted.output == "", inverted.output
    assert (tmp_path / "circle.latent.safetensors").is_file()
    missing = _icd("edit", tmp_path / "missing.png", *PROMPTS, "-q")
    assert missing.exit_code != 0 and "missing.png" in missing.stderr
    usage = _icd("invert", EXAMPLES / "red-circle.png", "--prompt", " ", "-q")
    assert usage.exit_code == 2 and "--prompt is empty" in usage.stderr


def test_verbose_adds_detail_to_what_an_edit_says(tmp_path):
    args = ["edit", EXAMPLES / "red-circle.png", *PROMPTS, "-o", tmp_path / "edit.png", "--overwrite"]
    plain, verbose = _icd(*args), _icd(*args, "-v")
    assert plain.exit_code == 0 and verbose.exit_code == 0, verbose.output
    assert "loaded in" not in plain.stderr and "loaded in" in verbose.stderr  # the model's loading, timed
    assert "icd edit: " in verbose.stderr.splitlines()[-1]  # the whole command, timed
    assert "icd edit: " not in plain.stderr and "wrote " in plain.stderr and "wrote " in verbose.stderr
    (times,) = [line for line in verbose.stderr.splitlines() if line.startswith(f"DEBUG: {tmp_path / 'edit.png'}: ")]
    stages = [part.split()[0] for part in times.split(": ", 2)[2].split(", ")]
    assert stages[0] == "load" and {"encode", "decode", "write"} <= set(stages) and stages[-1] == "total", times
    assert str(tmp_path) not in plain.stderr.replace(f"wrote {tmp_path / 'edit.png'}", "")  # -v's line alone


@pytest.mark.slow
def test_json_is_the_same_under_quiet_and_verbose(tmp_path):
    records = {}
    for flags in ([], ["-q"], ["-v"]):
        out = tmp_path / f"edit{''.join(flags)}.png"
        result = _icd("edit", EXAMPLES / "red-circle.png", *PROMPTS, "-o", out, "--json", *flags)
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout)
        records[tuple(flags)] = {k: v for k, v in record.items() if k not in ("seconds", "output")}
        assert result.stderr == "" or flags != ["-q"], result.stderr
    assert records[()] == records[("-q",)] == records[("-v",)]
    failed = _icd("edit", tmp_path / "missing.png", *PROMPTS, "--json", "-q")
    assert failed.exit_code != 0 and json.loads(failed.stdout)["status"] == "failed"


def test_quiet_and_verbose_together_is_a_usage_error():
    result = _icd("info", "-q", "-v")
    assert result.exit_code == 2 and "-q and -v" in result.stderr
    assert _icd("-q", "info", "-v").exit_code == 2


def test_quiet_keeps_a_commands_report_and_logged_errors():
    """stdout is the result a command was asked for; -q only removes the messages on stderr."""
    assert _icd("info").stdout == _icd("info", "-q").stdout != ""


def test_the_icd_log_goes_through_the_console_at_its_level():
    logger = logging.getLogger("icd")

    @click.command()
    @console_options
    def speak() -> None:
        logger.debug("a detail")
        logger.info("a note")
        logger.warning("a warning")
        logger.error("an error")

    lines = {flags: CliRunner().invoke(speak, list(flags)).stderr.splitlines() for flags in ((), ("-q",), ("-v",))}
    assert lines[()] == ["a note", "WARNING: a warning", "ERROR: an error"]
    assert lines[("-q",)] == ["ERROR: an error"]
    assert lines[("-v",)] == ["DEBUG: a detail", *lines[()]]
    assert logger.level == logging.NOTSET or logger.level <= logging.INFO  # the invocation's level is not left behind


def test_a_note_is_said_once_per_command_and_warnings_every_time():
    """A folder's edits share their prompts: the note a prompt pair gives is not repeated for every photo."""
    logger = logging.getLogger("icd")

    @click.command()
    @console_options
    def speak() -> None:
        for _ in range(3):
            logger.info("the prompts have 1 and 2 words")
            logger.warning("a photo's profile cannot be used")
        logger.info("another note")

    for _ in range(2):  # each command says its notes anew
        lines = CliRunner().invoke(speak, []).stderr.splitlines()
        assert lines == ["the prompts have 1 and 2 words", *["WARNING: a photo's profile cannot be used"] * 3,
                         "another note"]  # fmt: skip
