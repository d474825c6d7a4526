"""`icd edit -` and `-o -`: the image read from stdin, the edit written to stdout, for pipelines
(`curl ... | icd edit - --src "a cat" --tgt "a dog" -o - | convert - ...`).

The runner edits files, so the piped ends pass through a private temporary folder: stdin's bytes are saved there as
the input, the output is written there and then copied to stdout. What the run says names them `stdin` and `stdout`
(its --json records `-`), never the temporary paths; the folder goes when the edit ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from icdcli.core.errors import ICDError, ICDUsageError
from icdcli.core.paths import human_size
from icdcli.run.batch import display
from icdcli.run.report import Reporter

PIPE = "-"
MAX_STDIN_BYTES = 512 * 2**20
"""The most stdin may hold: far above any photo (100 megapixels as PNG are about 300 MB), a bound on memory."""
INPUT_NAME, OUTPUT_STEM = "stdin", "stdin-edit"


@dataclass(frozen=True)
class PipedEnds:
    """The files the runner reads and writes for the piped ends: `image` (stdin's bytes, or the user's file) and
    `output` (a temporary file copied to stdout, or the user's -o; None: the runner's default)."""

    image: Path
    output: Path | None
    names: dict[str, tuple[str, str]]  # temporary path -> (its name in text, its value in JSON)

    def named(self, line: str) -> str:
        """`line` with the temporary paths named as the user knows them: `stdin`, `stdout`."""
        for path in sorted(self.names, key=len, reverse=True):  # the output's path starts with the input's
            line = line.replace(path, self.names[path][0])
        return line

    def reporter(self, reporter: Reporter) -> Reporter:
        """`reporter` with the temporary paths named as the user knows them: `stdin`, `stdout` (`-` in JSON)."""
        say, json, named = reporter.say, reporter.json, self.named

        def named_record(record: dict[str, Any]) -> None:
            assert json is not None
            json({key: self.names[value][1] if isinstance(value, str) and value in self.names else value
                  for key, value in record.items()})  # fmt: skip

        return replace(reporter, say=lambda line: say(named(line)), json=named_record if json is not None else None)


def check_piped(images: list[str], output: str | None, *, as_json: bool, others: list[str]) -> None:
    """Usage errors of the piped forms: `-` is the only IMAGE, `-o -` has one input and no --json, and neither goes
    with the flags that edit many (`others`: those given, by name)."""
    reads_stdin = PIPE in images
    if others and (reads_stdin or output == PIPE):
        raise ICDUsageError(f"IMAGE - and -o - edit one piped image: leave out {', '.join(others)}")
    if reads_stdin and len(images) > 1:
        raise ICDUsageError("IMAGE - reads one image from stdin: give it alone")
    if output == PIPE and len(images) != 1:
        raise ICDUsageError("-o - writes one edit to stdout: give one IMAGE (a file, or - for stdin)")
    if reads_stdin and output is None:
        raise ICDUsageError("IMAGE - needs -o: a file to write, or - for stdout")
    if output == PIPE and as_json:
        raise ICDUsageError("-o - writes the image to stdout, where --json's records would go: leave --json out")


def read_stdin(stream: BinaryIO, *, limit: int = MAX_STDIN_BYTES) -> bytes:
    """Stdin's bytes: ICDUsageError where it is a terminal, ICDError where it is empty or holds more than `limit`."""
    if stream.isatty():
        raise ICDUsageError("IMAGE - reads the image from stdin, which is a terminal: pipe one in (< photo.jpg)")
    data = stream.read(limit + 1)
    if not data:
        raise ICDError("stdin is empty: pipe an image in (icd edit - --src ... --tgt ... < photo.jpg)")
    if len(data) > limit:
        raise ICDError(f"stdin holds more than {human_size(limit)}, more than any photo icd edits: pipe one image")
    return data


@contextlib.contextmanager
def piped_ends(image: str, output: str | None, stdin: BinaryIO, suffix: str = ".png") -> Iterator[PipedEnds]:
    """The files the runner reads and writes for `image` and `output` where either is `-` (see the module); what
    goes to stdout is written in the format of `suffix` (`--format`)."""
    with tempfile.TemporaryDirectory(prefix="icd-pipe-") as folder:
        names: dict[str, tuple[str, str]] = {}
        source = Path(image)
        if image == PIPE:
            source = Path(folder) / INPUT_NAME
            source.write_bytes(read_stdin(stdin))
            names[str(source)] = names[display(source)] = ("stdin", PIPE)
        target = Path(output) if output is not None else None
        if output == PIPE:
            target = Path(folder) / f"{OUTPUT_STEM}{suffix}"
            names[str(target)] = names[display(target)] = ("stdout", PIPE)
        yield PipedEnds(source, target, names)


def copy_to_stdout(path: Path, stdout: BinaryIO) -> None:
    """The finished edit's bytes onto stdout (nothing where the edit failed and wrote no file)."""
    if path.is_file():
        with path.open("rb") as edited:
            shutil.copyfileobj(edited, stdout)
        stdout.flush()
