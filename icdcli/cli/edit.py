"""`icd edit`: its flags and help, and the checks of what it was given; `icdcli.run` does the editing."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from icdcli.cli.common import check_prompt, given_flags, model_loader, reports_errors
from icdcli.cli.console import console_options, say
from icdcli.cli.options import (
    BACKEND_SECTION,
    MODEL_SECTION,
    AmplifyType,
    NumberType,
    SectionedCommand,
    ShardType,
    TextPath,
    batch_size_option,
    blend_keep_option,
    edit_guidance_options,
    model_options,
    overwrite_option,
    p2p_step_options,
    replace_tail_option,
    sampler_options,
    text_callback,
)
from icdcli.cli.results import reporter, reports_json_failures
from icdcli.diffusion.recipe import BLEND_THRESHOLD, EditRequest
from icdcli.run.batch import IMAGE_SUFFIXES, Shard
from icdcli.run.inputs import EditFlags, apply_record, collect_items, p2p_options
from icdcli.run.latents import edit_latents
from icdcli.run.piped import PIPE, check_piped, copy_to_stdout, piped_ends
from icdcli.run.planning import OUTPUT_FORMATS, plan_edit_outputs
from icdcli.run.runner import EditRun
from icdcli.run.watch import watch_folders


@click.command(
    cls=SectionedCommand,
    sections=[
        ("Inputs and prompts", ["source", "targets", "mask", "spec", "from_record", "latents", "recursive"]),
        ("Editing", ["method", "unguided_prompt", "guidance", "tau", "seed", "sampler", "ddim_steps"]),
        ("Prompt-to-Prompt (--method p2p)", ["cross_replace", "self_replace", "p2p_mode", "blend_words",
                                             "blend_source", "blend_target", "blend_threshold", "amplify",
                                             "amplify_new", "replace_tail", "blend_keep"]),
        ("Output and batch", ["output", "output_format", "quality", "overwrite", "keep_exif", "shard", "batch_size",
                              "jobs", "watch", "dry_run", "as_json"]),
        MODEL_SECTION,
        BACKEND_SECTION,
    ],
    examples=[
        "# cat.jpg -> cat-edit.png with the model's recipe",
        'icd edit cat.jpg --src "a cat" --tgt "a dog"',
        "# a folder and its subfolders into edited/, one JSON line per image",
        'icd edit photos/ -r --src "a cat" --tgt "a dog" -o edited/ --json',
        "# one inversion, three edits: cat-edit-1.png, cat-edit-2.png, cat-edit-3.png",
        'icd edit cat.jpg --src "a cat" --tgt "a dog" --tgt "a fox" --tgt "a tiger"',
        "# a hot folder: edit what is in inbox/ and what arrives there, as JPEGs, until Ctrl-C",
        'icd edit inbox/ --src "a cat" --tgt "a dog" -o outbox/ --format jpg --watch',
        "# only the white part of mask.png may change; the rest keeps the photo's own pixels",
        'icd edit cat.jpg --src "a cat" --tgt "a dog" --mask mask.png',
        "# Prompt-to-Prompt local blend: only the cat's / dog's region may change",
        'icd edit cat.jpg --src "a cat" --tgt "a dog" --blend-src cat --blend-tgt dog',
        "# invert once, then edit the latents with any target (the decode alone; the same pixels as a whole edit)",
        'icd invert cat.jpg --prompt "a cat" && icd edit --latents cat.latent.safetensors --tgt "a dog"',
        "# one edit per row of a spec file",
        "icd edit --spec edits.jsonl -o edited/",
        "# a script's edits through one process with the model loaded: JSON lines in, JSON lines out",
        'echo \'{"image": "cat.jpg", "src": "a cat", "tgt": "a dog"}\' | icd edit --jobs -',
        "# the folder split over 2 processes (one GPU each, or CPU processes): see docs/batch.md",
        "accelerate launch --multi_gpu --num_processes 2 -m icdcli edit photos/ -o edited/ --src ... --shard auto",
        "# the released SD1.5 checkpoint, from a release tarball's folder and a local base pipeline",
        'icd edit cat.jpg --src "a cat" --tgt "a dog" --model iCD-SD15_4steps_1/ --base sd15-base/',
    ],
)  # fmt: skip
@click.argument("images", nargs=-1, type=TextPath(path_type=Path))
@click.option(
    "--src",
    "source",
    default=None,
    callback=text_callback("prompt"),
    help="Prompt that describes the input image (or per row in --spec).",
)
@click.option(
    "--tgt",
    "targets",
    multiple=True,
    callback=text_callback("prompt"),
    help="Prompt that describes the wanted result (or per row in --spec). Repeat it for several edits of each "
    "image from one inversion: IMAGE-edit-1.png, IMAGE-edit-2.png, ... in the order given.",
)
@click.option(
    "-o",
    "--output",
    type=TextPath(),
    default=None,
    help="Output file (one input) or folder (mirrors the layout of folder inputs); - writes the image to stdout "
    "(a PNG, or --format's). Default: IMAGE-edit.png (or --format's suffix) beside each input.",
)
@click.option(
    "--spec",
    type=TextPath(path_type=Path),
    default=None,
    help="A .jsonl or .csv file, one edit per row: image, src, tgt and optionally guidance, tau, seed, output, "
    "blended_word, replace_tail, mask.",
)
@click.option(
    "--mask",
    type=TextPath(path_type=Path),
    default=None,
    metavar="MASK.png",
    help="Edit only the white part of this image (the photo's shape, any size; grey changes partly, black and "
    "transparent stay): outside it the result keeps the photo's own pixels. Applies to every IMAGE; a --spec row's "
    "mask wins.",
)
@click.option(
    "--from",
    "from_record",
    type=TextPath(path_type=Path),
    default=None,
    metavar="OUTPUT.png",
    help="Repeat the edit recorded in an output of icd edit; flags given override the record.",
)
@click.option(
    "--latents",
    type=TextPath(path_type=Path),
    default=None,
    metavar="FILE.safetensors",
    help="Edit the latents icd invert wrote (the decode alone) with --tgt and any guidance, tau, method and P2P "
    "settings; the source prompt, seed and sampler are the inversion's. Default output: NAME-edit.png beside it.",
)
@click.option("-r", "--recursive", is_flag=True, help="Descend into subfolders of folder inputs.")
@overwrite_option
@click.option(
    "--keep-exif",
    is_flag=True,
    help="Copy each input's EXIF (camera, lens, date, GPS ...) into its output, its orientation set upright. "
    "Default: outputs carry only icd's record.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(OUTPUT_FORMATS),
    default=None,
    help="Format of the outputs icd names (IMAGE-edit.jpg, ...): png (lossless, the default), jpg or webp. All "
    "three carry the edit's record (a rerun skips what is made). Default: png, or -o FILE's own suffix.",
)
@click.option(
    "--quality",
    type=NumberType("quality"),
    default=None,
    help="JPEG and WebP quality (--format jpg or webp, or -o FILE.jpg).  [default: 95 for jpg, 90 for webp]",
)
@click.option(
    "--shard",
    type=ShardType(),
    default=None,
    help="Edit only shard I of N (0-based; by a stable hash of each item). auto: RANK/WORLD_SIZE from accelerate.",
)
@batch_size_option
@click.option(
    "--jobs",
    "jobs",
    type=click.Choice(["-"]),
    default=None,
    help="-: keep the model loaded and read edits from stdin, one JSON object per line (the fields of a .jsonl "
    "spec row); one JSON result line per edit on stdout; a bad line gives a failed line, end of input ends.",
)
@click.option(
    "--watch",
    is_flag=True,
    help="After the images in the IMAGE folders, keep the model loaded and edit each image file that appears in "
    "them (or changes) until Ctrl-C: a hot folder. Files are read once nothing has written to them for a second.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Say what would be edited (each input, its output, whether that exists) and check the inputs, without "
    "loading a model or writing anything; exit 1 when an item could not run.",
)
@click.option(
    "--any-output",
    is_flag=True,
    help="Let a --spec row's output be any path (absolute, or leaving the output folder through ..).",
)
@edit_guidance_options
@click.option(
    "--method",
    type=click.Choice(["auto", "p2p", "swap"]),
    default="auto",
    show_default=True,
    help="p2p: Prompt-to-Prompt, the target's attention taken from the source's (keeps layout and background). "
    "swap: decode with the target prompt, the unguided steps (t > tau*1000) with the source prompt. auto: the "
    "model's recipe (p2p for SD1.5-family models, swap for SDXL, as the paper edits).",
)
@click.option(
    "--unguided-prompt",
    type=click.Choice(["source", "target"]),
    default=None,
    help="swap: the prompt of the unguided steps (t > tau*1000): source preserves more (the default), target "
    "edits more (the release's amplify_prompt).",
)
@p2p_step_options
@click.option(
    "--p2p-mode",
    type=click.Choice(["auto", "replace", "refine"]),
    default=None,
    help="p2p: replace (word for word; equal word counts), refine (align the token sequences) or auto "
    "(replace when the word counts are equal). Default: the model's (auto).",
)
@click.option(
    "--blend",
    "blend_words",
    multiple=True,
    callback=text_callback("word"),
    metavar="WORD",
    help="p2p local blend: only the region of these words may change (words of either prompt, matched exactly; "
    "repeatable).",
)
@click.option(
    "--blend-src",
    "blend_source",
    multiple=True,
    callback=text_callback("word"),
    metavar="WORD",
    help="p2p local blend: words of the source prompt whose region may change (the release's per-prompt form).",
)
@click.option(
    "--blend-tgt",
    "blend_target",
    multiple=True,
    callback=text_callback("word"),
    metavar="WORD",
    help="p2p local blend: words of the target prompt whose region may change.",
)
@click.option(
    "--blend-threshold",
    type=NumberType("blend_threshold"),
    default=BLEND_THRESHOLD,
    show_default=True,
    help="p2p local blend: part of its maximum above which a word's attention counts as its region.",
)
@click.option(
    "--amplify",
    type=AmplifyType(),
    multiple=True,
    help="p2p reweight: multiply the target's attention to WORD by FACTOR (repeatable), e.g. --amplify red=2.",
)
@click.option(
    "--amplify-new",
    type=NumberType("amplify"),
    default=None,
    metavar="FACTOR",
    help="p2p reweight of every target word not in the source (English stopwords excepted); 1 = off. "
    "Default: the model's (4 in the released SD1.5 recipe).",
)
@replace_tail_option
@blend_keep_option
@sampler_options
@model_options
@console_options
@reports_json_failures
@reports_errors
def edit(
    images: tuple[Path, ...],
    source: str | None,
    targets: tuple[str, ...],
    output: str | None,
    spec: Path | None,
    mask: Path | None,
    from_record: Path | None,
    latents: Path | None,
    recursive: bool,
    overwrite: bool,
    keep_exif: bool,
    output_format: str | None,
    quality: int | None,
    shard: Shard | None,
    batch_size: int | None,
    jobs: str | None,
    watch: bool,
    dry_run: bool,
    any_output: bool,
    guidance: float | None,
    tau: float | None,
    method: str,
    unguided_prompt: str | None,
    cross_replace: float | None,
    self_replace: float | None,
    p2p_mode: str | None,
    blend_words: tuple[str, ...],
    blend_source: tuple[str, ...],
    blend_target: tuple[str, ...],
    blend_threshold: float,
    amplify: tuple[tuple[str, float], ...],
    amplify_new: float | None,
    replace_tail: str,
    blend_keep: str,
    seed: int | None,
    sampler: str,
    ddim_steps: int,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Edit IMAGE(s) from the --src description to the --tgt description.

    The image is inverted with the source prompt by the forward model, then decoded by the reverse
    model. With --method p2p (Prompt-to-Prompt) the source and target branches are decoded together
    and the target's attention maps are taken from the source's, so layout and background stay;
    prompts of equal word counts replace word for word, others are aligned token by token. With
    --method swap the target prompt decodes the guided steps and the source prompt the unguided ones
    (t > tau*1000). Images of any size are resized to the model's native area, edited, and returned
    at their own size.

    Defaults come from the model's edit recipe (icd info lists the presets'): the released SD1.5
    checkpoints edit with p2p, guidance 20 (the release's scripts write 19: they count w - 1), tau
    0.8, cross 0.3, self 0.6, amplify 4 on new words, seed 30. Flags given always win.

    IMAGE may be a file or a folder (image files inside; -r descends), or - for one image on stdin
    (with -o FILE, or -o - for a pipe: cat a.jpg | icd edit - ... -o - > b.png). Each output records its
    parameters; a rerun skips outputs already made with the same ones. Ctrl-C stops after the
    current image (twice: at once), exit code 130.
    """
    started = time.perf_counter()
    p2p = p2p_options(
        cross_replace, self_replace, p2p_mode, blend_words, blend_source, blend_target, amplify, amplify_new,
        blend_threshold, replace_tail, blend_keep,
    )  # fmt: skip
    request = EditRequest(method, guidance, tau, seed, sampler, ddim_steps, p2p)
    target = targets[0] if len(targets) == 1 else None  # several: one item per target (collect_items)
    recorded = FORMAT_SUFFIXES.get(from_record.suffix.lower(), ".png") if from_record is not None else ".png"
    suffix = output_suffix(output_format, quality, output, many=bool(spec or jobs), default=recorded)
    given = given_flags() | ({"target"} if targets else set())  # what a recorded edit's values give way to
    settings = EditFlags(source, target, request, unguided_prompt, given, mask, keep_exif, suffix, quality)
    piped = [str(image) for image in images]
    if len(targets) > 1:
        _check_several_targets(targets, output, spec=spec, from_record=from_record, jobs=jobs, piped=piped)
    if dry_run:
        refused = _given(("--jobs", jobs is not None), ("--watch", watch), ("--latents", latents is not None),
                         ("IMAGE -", PIPE in piped), ("-o -", output == PIPE))  # fmt: skip
        if refused:
            raise click.UsageError(f"--dry-run plans files and folders: not with {refused[0]}")
    if watch:
        _check_watch(images, latents=latents, spec=spec, from_record=from_record, jobs=jobs, shard=shard, output=output)
        _check_edit_prompts(settings, None, several=len(targets) > 1)
        runner = EditRun(settings, model_loader(model_opts), batch=True, overwrite=overwrite,
                         reporter=reporter(as_json), started=started, batch_size=batch_size)  # fmt: skip
        watch_folders(runner, list(images), recursive=recursive, targets=targets, output=output, any_output=any_output)
        return
    if latents is not None:
        if images or spec is not None or from_record is not None or jobs is not None or shard is not None:
            raise click.UsageError("--latents edits one saved inversion: no IMAGE, --spec, --from, --jobs or --shard")
        if target is not None:
            check_prompt(target, "--tgt")
        edit_latents(latents, settings, output=output, overwrite=overwrite, load=model_loader(model_opts),
                     reporter=reporter(as_json), started=started, targets=targets)  # fmt: skip
        return
    if PIPE in piped or output == PIPE:
        others = _given(("--spec", spec is not None), ("--from", from_record is not None), ("--jobs", jobs is not None),
                        ("--shard", shard is not None), ("-r", recursive))  # fmt: skip
        check_piped(piped, output, as_json=as_json, others=others)
        _check_edit_prompts(settings, None)
        _edit_piped(piped[0], output, settings, model_opts, as_json=as_json, overwrite=overwrite,
                    any_output=any_output, batch_size=batch_size, started=started)  # fmt: skip
        return
    expected_hash = None
    if from_record is not None:
        if spec is not None:
            raise click.UsageError("--from repeats one edit: give it without --spec")
        images, settings, expected_hash = apply_record(from_record, images, flags=settings, model_opts=model_opts)
    if jobs is not None:
        if images or spec is not None or from_record is not None or shard is not None:
            raise click.UsageError("--jobs - reads every edit from stdin: give no IMAGE, --spec, --from or --shard")
        runner = EditRun(settings, model_loader(model_opts), batch=True, overwrite=overwrite, reporter=reporter(True),
                         started=started, batch_size=batch_size)  # fmt: skip
        runner.run_jobs(sys.stdin, output=output, any_output=any_output)
        return
    if not images and spec is None:
        raise click.UsageError("nothing to edit: give IMAGE files or folders, --spec FILE or --from OUTPUT.png")
    _check_edit_prompts(settings, spec, several=len(targets) > 1)
    items, batch = _collected_items(images, spec, recursive, settings, targets)
    items = plan_edit_outputs(items, output, spec=spec, batch=batch or shard is not None, anywhere=any_output,
                              suffix=settings.suffix, create=not dry_run)  # fmt: skip
    if shard is not None:
        items, model_opts = _this_shard(items, shard, model_opts=model_opts)
    if dry_run:
        _report_dry_run(items, as_json=as_json, overwrite=overwrite)
        return
    runner = EditRun(settings, model_loader(model_opts), batch=batch or shard is not None, overwrite=overwrite,
                     reporter=reporter(as_json), started=started, expected_hash=expected_hash,
                     batch_size=batch_size)  # fmt: skip
    runner.shard = (shard.index, shard.count) if shard is not None and shard.auto else None
    runner.run(items)


def _edit_piped(
    image: str, output: str | None, settings: EditFlags, model_opts: dict[str, Any], *, as_json: bool,
    overwrite: bool, any_output: bool, batch_size: int | None, started: float,
) -> None:  # fmt: skip
    """`icd edit -` (the image on stdin) and `-o -` (the edit on stdout): one item through the runner, its piped
    ends named stdin and stdout in what it says (`icdcli.run.piped`)."""
    from dataclasses import replace

    from icdcli.core.errors import ICDError

    with piped_ends(image, output, sys.stdin.buffer, settings.suffix) as ends:
        try:
            items, _ = _collected_items((ends.image,), None, False, settings)
            if image == PIPE:
                items = [replace(item, recorded_input=PIPE) for item in items]
            if output == PIPE:  # written from a private folder: the record names the files by their absolute paths
                items = [replace(item, recorded_input=item.recorded_input or os.path.abspath(item.image),
                                 recorded_mask=None if item.mask is None else os.path.abspath(item.mask))
                         for item in items]  # fmt: skip
            target = None if ends.output is None else str(ends.output)
            items = plan_edit_outputs(items, target, spec=None, batch=False, anywhere=any_output,
                                      suffix=settings.suffix)  # fmt: skip
            runner = EditRun(settings, model_loader(model_opts), batch=False, overwrite=overwrite or output == PIPE,
                             reporter=ends.reporter(reporter(as_json)), started=started,
                             batch_size=batch_size)  # fmt: skip
            runner.run(items)
        except ICDError as error:  # its message names the piped ends as the user knows them
            error.args = (ends.named(str(error)),)
            raise
        except click.UsageError:
            raise
        except click.ClickException as error:  # a spec or folder error of the one item, named alike
            raise click.ClickException(ends.named(error.format_message())) from None
        if output == PIPE and ends.output is not None:
            copy_to_stdout(ends.output, sys.stdout.buffer)


def _collected_items(
    images: tuple[Path, ...], spec: Path | None, recursive: bool, settings: EditFlags, targets: tuple[str, ...] = ()
) -> tuple[list[Any], bool]:
    """The items to edit (and whether they are a batch), a bad spec or folder as a one-line error."""
    from icdcli.run.batch import SpecError

    try:
        return collect_items(list(images), spec=spec, recursive=recursive, flags=settings, targets=targets)
    except (SpecError, ValueError) as error:
        raise click.ClickException(str(error)) from None


FORMAT_SUFFIXES = {".png": ".png", ".jpg": ".jpg", ".jpeg": ".jpg", ".webp": ".webp"}
"""-o FILE's suffix -> the --format it is (the output formats of `icdcli.io.images.OUTPUT_SUFFIXES`)."""


def output_suffix(
    output_format: str | None, quality: int | None, output: str | None, *, many: bool, default: str = ".png"
) -> str:
    """The suffix of the outputs icd names, from --format (else -o FILE's own suffix, else `default`: .png, or the
    format of the --from output); usage errors for --format against -o FILE's suffix, and for --quality where every
    output is a PNG."""
    named = None
    if output not in (None, PIPE) and not Path(output).is_dir() and not output.endswith(("/", os.sep)):
        named = FORMAT_SUFFIXES.get(Path(output).suffix.lower())
    suffix = f".{output_format}" if output_format is not None else default
    if output_format is not None and named is not None and named != suffix:
        raise click.UsageError(f"-o {output} and --format {output_format} disagree: give one of them")
    if quality is not None and suffix == ".png" and named in (None, ".png") and not many:
        raise click.UsageError(
            "--quality sets JPEG and WebP quality; PNG outputs are lossless: add --format jpg or webp"
        )
    return suffix


def _report_dry_run(items: list[Any], *, as_json: bool, overwrite: bool) -> None:
    """Each planned item's input, output and whether it exists (or why it cannot run), then the counts; exit 1 when
    an item cannot run. No model is loaded, nothing is written."""
    from icdcli.run.batch import display
    from icdcli.run.planning import dry_run

    records = dry_run(items, overwrite=overwrite)
    report = reporter(as_json)
    for record in records:
        if report.json is not None:
            report.json(record)
        elif record["status"] == "failed":
            say(f"Error: {record['error']}")
        else:
            exists = " (exists: replaced, --overwrite)"
            if not overwrite:
                exists = " (exists: skipped when made with the same settings, else refused without --overwrite)"
            say(f"{display(record['input'])} -> {display(record['output'])}{exists if record['exists'] else ''}")
    planned = [record for record in records if record["status"] == "planned"]
    failed = len(records) - len(planned)
    existing = sum(record["exists"] for record in planned)
    if report.json is not None:
        report.json({"status": "summary", "planned": len(planned), "existing": existing, "failed": failed})
    say(f"dry run: {len(planned)} edits planned ({existing} of their outputs exist), {failed} failed; nothing was "
        "edited")  # fmt: skip
    if failed:
        sys.exit(1)


def _check_watch(
    images: tuple[Path, ...], *, latents: Path | None, spec: Path | None, from_record: Path | None,
    jobs: str | None, shard: Shard | None, output: str | None,
) -> None:  # fmt: skip
    """--watch watches folders given as IMAGE, and takes nothing that edits another way."""
    given = _given(("--latents", latents is not None), ("--spec", spec is not None),
                   ("--from", from_record is not None), ("--jobs", jobs is not None), ("--shard", shard is not None),
                   ("-o -", output == PIPE))  # fmt: skip
    if given:
        raise click.UsageError(f"--watch edits what appears in IMAGE folders: not with {given[0]}")
    if not images:
        raise click.UsageError("--watch needs the folders to watch: give them as IMAGE")
    files = [image for image in images if str(image) == PIPE or not image.is_dir()]
    if files:
        raise click.UsageError(f"--watch watches folders: {files[0]} is not one (give folders as IMAGE)")


def _given(*flags: tuple[str, bool]) -> list[str]:
    """The names of the flags given, of (name, whether given) pairs."""
    return [name for name, present in flags if present]


def _check_several_targets(
    targets: tuple[str, ...], output: str | None, *, spec: Path | None, from_record: Path | None, jobs: str | None,
    piped: list[str],
) -> None:  # fmt: skip
    """Several --tgt edit each IMAGE (or the --latents) once per target into files of their own: not with what
    gives one edit."""
    for target in targets:
        check_prompt(target, "--tgt")
    given = _given(("--spec", spec is not None), ("--from", from_record is not None), ("--jobs", jobs is not None),
                   ("IMAGE -", PIPE in piped), ("-o -", output == PIPE))  # fmt: skip
    if given:
        raise click.UsageError(
            f"several --tgt edit each IMAGE file once per target: not with {given[0]} (give one --tgt, or one "
            "edit per row of a --spec)"
        )
    if (
        output is not None
        and not Path(output).is_dir()
        and not output.endswith(("/", os.sep))
        and Path(output).suffix.lower() in IMAGE_SUFFIXES
    ):
        raise click.UsageError(
            f"several --tgt write a file per target: -o {output} names one file; give -o a folder (edited/)"
        )


def _check_edit_prompts(settings: EditFlags, spec: Path | None, *, several: bool = False) -> None:
    """--src and --tgt are non-empty when given, and both given unless a --spec's rows give them."""
    for value, flag in ((settings.source, "--src"), (settings.target, "--tgt")):
        if value is not None:
            check_prompt(value, flag)
    given = ((settings.source, "--src"), (settings.target or ("several" if several else None), "--tgt"))
    missing = [flag for value, flag in given if value is None]
    if spec is None and missing:
        raise click.UsageError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} needed: --src describes the image, "
            "--tgt the result (or give a --spec whose rows give src and tgt)"
        )


def _this_shard(items: list, shard: Shard, *, model_opts: dict[str, Any]) -> tuple[list, dict[str, Any]]:
    """The items of this process's shard; under a launcher (--shard auto, LOCAL_RANK set) its own GPU."""
    from icdcli.run.batch import select_shard

    items = select_shard(items, shard.index, shard.count)
    say(f"shard {shard.index}/{shard.count}: {len(items)} items")
    if shard.auto and model_opts["device"] == "auto" and "LOCAL_RANK" in os.environ:
        model_opts = {**model_opts, "device": f"cuda:{os.environ['LOCAL_RANK']}", "_cuda_if_present": True}
    return items, model_opts
