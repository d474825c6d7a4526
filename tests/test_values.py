"""One check for every number, whatever gives it: flags are usage errors, JSON is always strict."""

import json
import math

import pytest
from click.testing import CliRunner

from icdcli.cli.main import main
from icdcli.core.values import NUMBERS, NumberError, check_number, strict_json

BAD = ["nan", "NaN", "inf", "-inf", "1e308", "-1e308", "99999999999999999999", "-1", "abc", "", "0x10", "1,5"]


@pytest.mark.parametrize("name", sorted(NUMBERS))
@pytest.mark.parametrize("value", [*BAD, float("nan"), float("inf"), True, None, [1], 10**30])
def test_every_number_refuses_what_is_not_in_its_range(name, value):
    bounds = NUMBERS[name]
    if value == "-1" and bounds.low < 0:
        pytest.skip("negative values allowed")
    with pytest.raises(NumberError) as caught:
        check_number(name, value)
    message = str(caught.value)
    assert name.replace("_", "-") in message and "from" in message and "\n" not in message


@pytest.mark.parametrize("name", sorted(NUMBERS))
def test_every_number_takes_its_bounds_and_text(name):
    bounds = NUMBERS[name]
    for value in (bounds.low, bounds.high, str(bounds.low), f" {bounds.high} "):
        number = check_number(name, value)
        assert isinstance(number, bounds.kind) and bounds.low <= number <= bounds.high


def test_integral_floats_are_integers_and_fractions_are_not():
    assert check_number("seed", 7.0) == 7 and check_number("seed", "1e3") == 1000 and check_number("seed", "7") == 7
    for value in (7.5, "7.5", "1e400"):
        with pytest.raises(NumberError):
            check_number("seed", value)


def test_strict_json_has_no_nan_or_infinity():
    text = strict_json({"a": math.nan, "b": [math.inf, 1.5, {"c": -math.inf}], "d": "nan"})
    assert json.loads(text, parse_constant=lambda name: pytest.fail(name)) == {"a": None, "b": [None, 1.5, {"c": None}],
                                                                              "d": "nan"}  # fmt: skip


FLAGS = {
    "edit": ["--guidance", "--tau", "--cross-replace", "--self-replace", "--blend-threshold", "--seed", "--ddim-steps"],
    "generate": ["--guidance", "--tau", "--seed", "--width", "--height", "--ddim-steps"],
    "invert": ["--guidance", "--tau", "--seed", "--ddim-steps"],
}


def _command(name, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"")  # never read: the flags are refused first
    return {
        "edit": ["edit", str(photo), "--src", "a cat", "--tgt", "a dog", "-o", str(tmp_path / "out.png")],
        "generate": ["generate", "a cat", "-o", str(tmp_path / "out.png")],
        "invert": ["invert", str(photo), "--prompt", "a cat", "-o", str(tmp_path / "out.safetensors")],
    }[name]


@pytest.mark.parametrize(("command", "flag"), [(c, f) for c, flags in FLAGS.items() for f in flags])
def test_bad_numbers_in_flags_are_usage_errors_before_any_work(command, flag, tmp_path):
    for value in ("nan", "inf", "1e308", "99999999999999999999", "-5"):
        result = CliRunner().invoke(main, [*_command(command, tmp_path), flag, value, "--json"])
        assert result.exit_code == 2, (flag, value, result.output)
        assert "Traceback" not in result.output and result.stdout == ""
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and flag in errors[0] and value in errors[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]


@pytest.mark.parametrize("value", ["nan", "inf", "1e308", "-1", "x"])
def test_bad_amplify_factors_are_usage_errors(value, tmp_path):
    args = [*_command("edit", tmp_path), "--amplify", f"dog={value}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "'--amplify': 'dog=" + value + "': amplify must be a finite number" in errors[0]
    assert "write WORD=FACTOR, e.g. red=2" in errors[0]


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [("--amplify", "dog", "'dog': write WORD=FACTOR"), ("--amplify", "=2", "'=2': write WORD=FACTOR"),
     ("--shard", "3/2", "'3/2': I must be 0..N-1"), ("--shard", "x", "'x': write I/N with 0 <= I < N")],
)  # fmt: skip
def test_bad_amplify_and_shard_values_are_usage_errors_that_say_what_to_write(flag, value, expected, tmp_path):
    result = CliRunner().invoke(main, [*_command("edit", tmp_path), flag, value])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and f"'{flag}': {expected}" in errors[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]


def test_a_non_finite_result_is_an_error_not_a_black_image():
    import torch

    from icdcli.core.errors import ICDError
    from icdcli.io.images import tensor_to_image

    pixels = torch.zeros(1, 3, 16, 16)
    assert tensor_to_image(pixels).size == (16, 16)
    for bad in (float("nan"), float("inf")):
        pixels[0, 1, 3, 4] = bad
        with pytest.raises(ICDError, match="non-finite"):
            tensor_to_image(pixels)
