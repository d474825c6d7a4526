"""--help reads as sections a user can scan, and ends with examples that paste as they are."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from icdcli.cli.main import main


def _help(command: str) -> str:
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def test_edit_help_groups_every_option_and_ends_with_examples():
    text = _help("edit")
    titles = ["Inputs and prompts:", "Editing:", "Prompt-to-Prompt (--method p2p):", "Output and batch:", "Model:",
              "Backend:", "Examples:"]  # fmt: skip
    positions = [text.index(f"\n{title}\n") for title in titles]
    assert positions == sorted(positions)
    between = text[text.index("\nOther options:\n") : text.index("\nExamples:\n")]
    assert "--help" in between and "--src" not in between and "[IMAGES]" not in between  # nothing left ungrouped
    assert text.index("--blend-src") > positions[2] and text.index("--blend-src") < positions[3]
    example = 'icd edit cat.jpg --src "a cat" --tgt "a dog" --blend-src cat --blend-tgt dog'
    assert f"  {example}\n" in text  # not re-wrapped
    assert "the release's" in text and "w - 1" in text  # the guidance convention


@pytest.mark.parametrize("command", ["invert", "generate"])
def test_other_commands_group_model_and_backend(command):
    text = _help(command)
    assert "\nModel:\n" in text and "\nBackend:\n" in text and "\nExamples:\n" in text
    assert "icd " + command in text.split("\nExamples:\n")[1]


def test_generate_seed_and_size_help_say_what_they_are():
    text = " ".join(_help("generate").split())
    assert "multiple of the model's size step" in text and "the starting noise (generate)" in text


def test_shell_completion_offers_commands_choices_presets_and_paths():
    from click.shell_completion import BashComplete

    from icdcli.cli.main import main

    def offered(args: list[str], incomplete: str) -> list[tuple[str, str]]:
        completer = BashComplete(main, {}, "icd", "_ICD_COMPLETE")
        return [(item.type, item.value) for item in completer.get_completions(args, incomplete)]

    assert ("plain", "edit") in offered([], "ed")
    assert offered(["edit", "x.png"], "--met") == [("plain", "--method")]
    assert offered(["edit", "x.png", "--backend"], "o") == [("plain", "onnxruntime"), ("plain", "openvino")]
    assert offered(["edit", "x.png", "--model"], "sd15-t") == [("file", "sd15-t"), ("plain", "sd15-tau0.7")]
    assert offered(["edit", "x.png", "--model"], "./my") == [("file", "./my")]  # not a preset: the shell's paths
    for flag in ("--base", "--base-config", "--teacher", "--forward-lora", "--reverse-lora"):
        assert offered(["export", flag], "w") == [("file", "w")], flag
