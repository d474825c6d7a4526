"""The flags and arguments `icd` commands share, their click types, and the sectioned --help.

A flag's value is checked here, where click reads it, by the checks of `icdcli.core` (`check_number`, `check_text`):
a bad value is a usage error (exit 2) that names the flag. Nothing heavy is imported at import time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import click

from icdcli.core.values import NUMBERS, NumberError, check_number
from icdcli.run.inputs import MODEL_FLAGS

PRESET_NAMES = "sd15, sd15-tau0.7, sd15-3step, sdxl, sd15-cycle"

BACKEND_CHOICES = ("auto", "tensorrt", "onnxruntime", "openvino", "torch")
"""`--backend` of the commands that edit, serve and measure throughput (icdcli.backends.accelerated.BACKENDS, without
importing torch)."""


class NumberType(click.ParamType):
    """A click parameter checked by `check_number` (bad values are usage errors)."""

    def __init__(self, name: str) -> None:
        self.number = name
        self.name = "integer" if NUMBERS[name].kind is int else "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return check_number(self.number, value)
        except NumberError as error:
            self.fail(str(error), param, ctx)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str | None:
        bounds = NUMBERS[self.number]
        return f"{self.name.upper()} {_plain(bounds.low)}..{_plain(bounds.high)}" if bounds.high < 1e6 else None


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def text_callback(kind: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that holds a flag's or argument's text (one value or several) to the bound of its `kind`
    (`icdcli.core.texts`): a prompt, a word or a path too long, or with a character it may not hold, is a usage
    error."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        from icdcli.core.texts import TextError, check_text

        for item in value if isinstance(value, (tuple, list)) else (value,):
            text = os.fspath(item) if isinstance(item, os.PathLike) else item
            try:
                check_text(kind, text, "the value")
            except TextError as error:
                raise click.BadParameter(str(error), ctx, param) from None
        return value

    return callback


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that refuses NaN and infinities (NaN compares false with both bounds, so passes them)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class TextPath(click.Path):
    """click.Path whose text is first held to the path bound of `icdcli.core.texts` (a NUL, or a path past 4,096
    characters, is a usage error rather than an exception from the file system)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from icdcli.core.texts import TextError, check_text

        text = os.fspath(value) if isinstance(value, os.PathLike) else value
        try:
            check_text("path", text, "the value")
        except TextError as error:
            self.fail(str(error), param, ctx)
        return super().convert(value, param, ctx)


class AmplifyType(click.ParamType):
    """`--amplify WORD=FACTOR`: a word of the target prompt and the factor on its attention, as (word, factor)."""

    name = "WORD=FACTOR"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, float]:
        if isinstance(value, tuple):
            return value
        word, sep, factor = str(value).partition("=")
        if not sep or not word.strip():
            self.fail(f"{_shown(value)}: write WORD=FACTOR with a factor from 0 to 100, e.g. red=2", param, ctx)
        from icdcli.core.texts import TextError, check_text

        try:
            check_text("word", word.strip(), "its word")
        except TextError as error:
            self.fail(str(error), param, ctx)
        try:
            return word.strip(), float(check_number("amplify", factor))
        except NumberError as error:
            self.fail(f"{_shown(value)}: {error}; write WORD=FACTOR, e.g. red=2", param, ctx)


def _shown(value: Any) -> str:
    from icdcli.core.texts import shown

    return shown(repr(str(value)), 60)


class ShardType(click.ParamType):
    """`--shard I/N` or `auto` (RANK and WORLD_SIZE of a launcher), as an `icdcli.run.batch.Shard`."""

    name = "I/N|auto"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str | None:
        return self.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from icdcli.run.batch import Shard, parse_shard

        if isinstance(value, Shard):
            return value
        try:
            return parse_shard(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


class BoundariesType(click.ParamType):
    """A comma list of timesteps (`0,259,519,779`), checked by `icdcli.diffusion.schedule.parse_boundaries`."""

    name = "boundaries"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        from icdcli.diffusion.schedule import parse_boundaries

        try:
            return parse_boundaries(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


def complete_model(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of --model: the presets that start with what is typed, else the shell's own paths (the path
    item comes first: bash's completion script starts its list over at one)."""
    from click.shell_completion import CompletionItem

    presets = [name.strip() for name in PRESET_NAMES.split(",")]
    return [CompletionItem(incomplete, type="file")] + [
        CompletionItem(name) for name in presets if name.startswith(incomplete)
    ]


def complete_path(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of a path flag that click types as text (a folder or a file): the shell's own paths."""
    from click.shell_completion import CompletionItem

    return [CompletionItem(incomplete, type="file")]


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--model",
            "model",
            default=None,
            callback=text_callback("path"),
            shell_complete=complete_model,
            metavar="NAME|PATH",
            help=f"A preset ({PRESET_NAMES}), an icd model folder (icd.json inside), a release tarball's folder "
            "(its LoRA files and teacher), or a hub id (org/repo) of either. Default: the embedded model.",
        ),
        click.option(
            "--base",
            default=None,
            callback=text_callback("path"),
            shell_complete=complete_path,
            metavar="DIR|FILE",
            help="Base pipeline: a diffusers folder, or a single-file SD1.5/SDXL checkpoint (.safetensors, converted "
            "once and cached), with LoRA files or a release folder. Default: the family's hub id.",
        ),
        click.option(
            "--base-config",
            default=None,
            callback=text_callback("path"),
            shell_complete=complete_path,
            metavar="DIR",
            help="For a single-file --base: a diffusers layout of its configs and tokenizers. Default: one beside "
            "the file, else the family's hub repository (cache first).",
        ),
        click.option(
            "--teacher",
            default=None,
            callback=text_callback("path"),
            shell_complete=complete_path,
            metavar="FILE",
            help="Guidance-distilled teacher UNet state dict (.safetensors, or .pt loaded weights-only).",
        ),
        click.option(
            "--forward-lora",
            default=None,
            callback=text_callback("path"),
            shell_complete=complete_path,
            metavar="FILE",
            help="Forward LoRA, e.g. iCD-SD15-forward_19_259_519_779.safetensors (or forward-19-259-519-779...).",
        ),
        click.option(
            "--reverse-lora",
            default=None,
            callback=text_callback("path"),
            shell_complete=complete_path,
            metavar="FILE",
            help="Reverse LoRA, e.g. iCD-SD15-reverse_259_519_779_999.safetensors.",
        ),
        click.option(
            "--forward-boundaries",
            type=BoundariesType(),
            default=None,
            metavar="T,T,...",
            help="The forward model's boundaries, for a file whose name does not carry them (e.g. 0,259,519,779 for "
            "Inverse-and-Edit's finetuned_forward_model.safetensors). A name that carries them must agree.",
        ),
        click.option(
            "--reverse-boundaries",
            type=BoundariesType(),
            default=None,
            metavar="T,T,...",
            help="The reverse model's boundaries, for a file whose name does not carry them (e.g. 259,519,779,999).",
        ),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
        click.option(
            "--precision",
            type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
            default="auto",
            show_default=True,
            help="UNet and text-encoder precision; auto is fp16 on CUDA; with --backend auto, bf16 on PyTorch for an "
            "SD-size model (UNet weights of 500 MB or more) on a CPU with bf16 matrix instructions (icd info says; "
            "fp32 opts out: ONNX Runtime fp32); fp32 elsewhere. The VAE runs in fp32, on CUDA in fp16 (SD1.5) or "
            "bf16 (SDXL).",
        ),
        click.option(
            "--low-memory/--no-low-memory",
            "low_memory",
            default=None,
            help="Free each UNet's weights once its stage of an edit is over (peak: one UNet, not two; each batch "
            "reads them again). Default: on when the two UNets exceed a quarter of this machine's memory, or on a "
            "GPU half of its free memory.",
        ),
        click.option(
            "--cuda-graphs/--no-cuda-graphs",
            "cuda_graphs",
            default=False,
            help="PyTorch on CUDA: replay each UNet call from a CUDA graph (captured on first use; a call that "
            "cannot be captured runs as before, with a note). Off until measured on a GPU (icd bench gpu).",
        ),
        click.option(
            "--compile",
            "compile_unets",
            is_flag=True,
            help="PyTorch on CUDA: torch.compile the UNets (the first call of each shape compiles, and says how "
            "long it took; P2P steps stay eager). Its cache lives in icd's cache folder.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def sampler_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--seed",
            type=NumberType("seed"),
            default=None,
            help="Seed of the noise: added to the image before inversion (edit, invert), or the starting noise "
            "(generate). Default: the model's edit recipe (30 for the released SD1.5 recipe, 0 for the embedded "
            "model) for edit and invert, 0 for generate.",
        ),
        click.option(
            "--sampler",
            type=click.Choice(["icd", "ddim"]),
            default="icd",
            show_default=True,
            help="icd: the forward/reverse consistency models. ddim: the teacher's DDIM baseline.",
        ),
        click.option(
            "--ddim-steps",
            type=NumberType("ddim_steps"),
            default=50,
            show_default=True,
            help="Steps of --sampler ddim.",
        ),
        click.option(
            "--backend",
            type=click.Choice(BACKEND_CHOICES),
            default="auto",
            show_default=True,
            envvar="ICD_BACKEND",
            help="Where the networks run. auto: TensorRT on a GPU when installed, else ONNX Runtime when installed, "
            "else PyTorch (the first accelerated run exports the model to ONNX); on a CPU with bf16 matrix "
            "instructions an SD-size model runs on PyTorch bf16 (with --precision auto; --precision fp32 for ONNX "
            "Runtime fp32). openvino: opt-in, CPU only (bf16 with --precision bf16). Env: ICD_BACKEND.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object per output on stdout."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def batch_size_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--batch-size N: images of one working size per network call (icd edit, icd bench pie)."""
    return click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Edit up to N images of one working size per network call. Default: by device and size (64 images of "
        "32x32 on the CPU, 16 of 512x512 on a GPU); results do not depend on it.",
    )(command)


def p2p_step_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--cross-replace and --self-replace: the Prompt-to-Prompt step fractions (see icdcli.diffusion.p2p)."""
    options = [
        click.option(
            "--cross-replace",
            type=NumberType("cross_replace"),
            default=None,
            help="p2p: fraction of the steps whose cross-attention follows the source (with N steps, the first "
            "int((N+1)*F)). Default: the model's (0.3 in the released SD1.5 recipe).",
        ),
        click.option(
            "--self-replace",
            type=NumberType("self_replace"),
            default=None,
            help="p2p: fraction of the steps whose self-attention (maps of up to 32x32) is the source's (the first "
            "int(N*F)). Default: the model's (0.6 in the released SD1.5 recipe).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def replace_tail_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--replace-tail aligned|release: the rule of a P2P replace edit's tokens after the last changed word."""
    return click.option(
        "--replace-tail",
        type=click.Choice(["aligned", "release"]),
        default="aligned",
        show_default=True,
        help="p2p replace: the tokens after the last changed word read their own counterparts' maps (aligned, "
        "icd's rule) or the maps the iCD release gives them, shifted when a changed word has another token count "
        "(release: only to replay its results exactly; docs/p2p.md).",
    )(command)


def blend_keep_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--blend-keep source|inversion: what P2P's local blend keeps outside the edited region."""
    return click.option(
        "--blend-keep",
        type=click.Choice(["source", "inversion"]),
        default="source",
        show_default=True,
        help="p2p local blend: outside the blend words' region the result keeps the source branch (source: "
        "P2P's and the release's rule) or the inversion's own latents at each step (inversion: the photo's own "
        "latents at the end, so the rest of the image comes back as the VAE gives it).",
    )(command)


def edit_guidance_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--guidance and --tau of an edit (None: the model's recipe, `icdcli.diffusion.recipe.EditRequest.resolve`)."""
    options = [
        click.option(
            "--guidance",
            type=NumberType("guidance"),
            default=None,
            help="Classical CFG scale w (1 = none); the release's scripts write w - 1 (their guidance_scale 19 "
            "is 20 here). Default: the model's edit guidance (icd; 20 for the released checkpoints), its "
            "generation guidance (ddim).",
        ),
        click.option(
            "--tau",
            type=NumberType("tau"),
            default=None,
            help="Dynamic guidance: guide only at t <= tau*1000. Default: the model's (icd), 1 (ddim).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


MODEL_SECTION = ("Model", list(MODEL_FLAGS))
BACKEND_SECTION = ("Backend", ["backend", "device", "precision", "low_memory", "cuda_graphs", "compile_unets"])


class SectionedCommand(click.Command):
    """A command whose --help lists its options in named sections, then examples.

    `sections` is a list of (title, parameter names); options in no section are listed last.
    """

    def __init__(
        self,
        *args: Any,
        sections: Sequence[tuple[str, list[str]]] = (),
        examples: Sequence[str] = (),
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.sections = list(sections)
        self.examples = list(examples)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx) if isinstance(p, click.Option)}
        placed: set[str | None] = set()
        for title, names in self.sections:
            rows = [record for name in names if (record := records.get(name))]
            placed.update(names)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        rest = [record for name, record in records.items() if record is not None and name not in placed]
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self.examples:
            with formatter.section("Examples"):
                for line in self.examples:  # commands are not re-wrapped: they must stay pastable
                    formatter.write(f"{'':>{formatter.current_indent}}{line}\n")
        super().format_epilog(ctx, formatter)


overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace existing outputs (default: skip those made with the same parameters)."
)
