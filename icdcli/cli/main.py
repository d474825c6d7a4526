"""The `icd` command line: the group, and the commands it holds (one module each under `icdcli.cli`).

Heavy libraries (torch, diffusers) are imported inside the commands, so `icd --help` stays instant.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import click

from icdcli import __version__
from icdcli.cli.bench import bench
from icdcli.cli.cache import cache
from icdcli.cli.console import console, console_options
from icdcli.cli.edit import edit
from icdcli.cli.export import export
from icdcli.cli.generate import generate
from icdcli.cli.info import info
from icdcli.cli.invert import invert
from icdcli.cli.serve import serve
from icdcli.cli.train import train


class _Group(click.Group):
    """The `icd` group: Ctrl-C and SIGTERM end any command with a line and exit 130 or 143, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        import signal

        from icdcli.core.stopping import EXIT_TERMINATED, exit_code, handle_sigterm

        previous = signal.getsignal(signal.SIGTERM)
        handle_sigterm()
        started = time.perf_counter()
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as stop:
            code = exit_code(stop)
            console().error("terminated" if code == EXIT_TERMINATED else "interrupted")
            raise click.exceptions.Exit(code) from None
        finally:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGTERM, previous)
            name = " ".join(["icd", *filter(None, [ctx.invoked_subcommand])])
            console().detail(f"{name}: {time.perf_counter() - started:.2f} s")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="icd")
@console_options
def main() -> None:
    """Edit real photos from text in about 8 network evaluations (invertible Consistency Distillation).

    A forward consistency model encodes a photo into noise in 3-4 steps; a reverse one decodes it
    under a new prompt in 3-4 steps with dynamic classifier-free guidance.

    \b
    Examples:
      icd edit photo.jpg --src "a cat" --tgt "a dog"
      icd invert photo.jpg --prompt "a cat" --reconstruct check.png
      icd generate "a red circle on a blue background" -o circle.png
      icd info
    """


for _command in (edit, invert, generate, bench, info, export, cache, train, serve):
    main.add_command(_command)
