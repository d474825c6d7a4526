"""The `icd` command line. Heavy libraries (torch, diffusers) are imported inside the commands."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from icdcli import __version__
from icdcli.bench.throughput import throughput as _throughput_command
from icdcli.cli.bench_gpu import gpu as _gpu_command
from icdcli.cli.bench_pie import pie as _pie_command
from icdcli.cli.bench_scale import scale as _scale_command
from icdcli.cli.cache import cache as _cache_command
from icdcli.cli.common import (
    BACKEND_SECTION,
    MODEL_SECTION,
    AmplifyType,
    SectionedCommand,
    ShardType,
    TextPath,
    batch_size_option,
    check_writable_folder,
    edit_guidance_options,
    load_model,
    model_options,
    need_scikit_image,
    overwrite_option,
    p2p_step_options,
    replace_tail_option,
    reports_errors,
    sampler_options,
    say,
    setup_logging,
    text_callback,
)
from icdcli.cli.export import export as _export_command
from icdcli.cli.train import train as _train_command
from icdcli.core.values import NumberType, strict_json
from icdcli.diffusion.recipe import BLEND_THRESHOLD, EditRequest
from icdcli.run.batch import Shard
from icdcli.run.claims import sweep
from icdcli.run.outputs import (
    GENERATE_FIELDS,
    LATENT_FIELDS,
    RECONSTRUCT_FIELDS,
    check_existing,
    emit,
    existing_record,
    image_text,
    path_from,
    reported_failure,
    reports_json_failures,
)
from icdcli.run.planning import plan_edit_outputs, plan_files, unique_path
from icdcli.run.runner import EditFlags, EditRun, apply_record, collect_items, edit_latents, p2p_options


def _check_prompt(value: str, flag: str) -> str:
    if not value or not value.strip():
        raise click.UsageError(f"{flag} is empty: give a prompt that describes the image")
    return value


class _Group(click.Group):
    """The `icd` group: Ctrl-C and SIGTERM end any command with a line and exit 130 or 143, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        import signal

        from icdcli.core.stopping import EXIT_TERMINATED, exit_code, handle_sigterm

        previous = signal.getsignal(signal.SIGTERM)
        handle_sigterm()
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as stop:
            code = exit_code(stop)
            say("terminated" if code == EXIT_TERMINATED else "interrupted")
            raise click.exceptions.Exit(code) from None
        finally:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="icd")
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
    setup_logging()


@main.command(
    cls=SectionedCommand,
    sections=[
        ("Inputs and prompts", ["source", "target", "spec", "from_record", "latents", "recursive"]),
        ("Editing", ["method", "unguided_prompt", "guidance", "tau", "seed", "sampler", "ddim_steps"]),
        ("Prompt-to-Prompt (--method p2p)", ["cross_replace", "self_replace", "p2p_mode", "blend_words",
                                             "blend_source", "blend_target", "blend_threshold", "amplify",
                                             "amplify_new", "replace_tail"]),
        ("Output and batch", ["output", "overwrite", "shard", "batch_size", "jobs", "as_json"]),
        MODEL_SECTION,
        BACKEND_SECTION,
    ],
    examples=[
        "# cat.jpg -> cat-edit.png with the model's recipe",
        'icd edit cat.jpg --src "a cat" --tgt "a dog"',
        "# a folder and its subfolders into edited/, one JSON line per image",
        'icd edit photos/ -r --src "a cat" --tgt "a dog" -o edited/ --json',
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
    "target",
    default=None,
    callback=text_callback("prompt"),
    help="Prompt that describes the wanted result (or per row in --spec).",
)
@click.option(
    "-o",
    "--output",
    type=TextPath(),
    default=None,
    help="Output file (one input) or folder (mirrors the layout of folder inputs). "
    "Default: IMAGE-edit.png beside each input.",
)
@click.option(
    "--spec",
    type=TextPath(path_type=Path),
    default=None,
    help="A .jsonl or .csv file, one edit per row: image, src, tgt and optionally guidance, tau, seed, output, "
    "blended_word, replace_tail.",
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
@sampler_options
@model_options
@reports_json_failures
@reports_errors
def edit(
    images: tuple[Path, ...],
    source: str | None,
    target: str | None,
    output: str | None,
    spec: Path | None,
    from_record: Path | None,
    latents: Path | None,
    recursive: bool,
    overwrite: bool,
    shard: Shard | None,
    batch_size: int | None,
    jobs: str | None,
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

    IMAGE may be a file or a folder (image files inside; -r descends). Each output PNG records its
    parameters; a rerun skips outputs already made with the same ones. Ctrl-C stops after the
    current image (twice: at once), exit code 130.
    """
    started = time.perf_counter()
    p2p = p2p_options(
        cross_replace, self_replace, p2p_mode, blend_words, blend_source, blend_target, amplify, amplify_new,
        blend_threshold, replace_tail,
    )  # fmt: skip
    request = EditRequest(method, guidance, tau, seed, sampler, ddim_steps, p2p)
    settings = EditFlags(source, target, request, unguided_prompt)
    if latents is not None:
        if images or spec is not None or from_record is not None or jobs is not None or shard is not None:
            raise click.UsageError("--latents edits one saved inversion: no IMAGE, --spec, --from, --jobs or --shard")
        if target is not None:
            _check_prompt(target, "--tgt")
        edit_latents(latents, settings, output=output, overwrite=overwrite, as_json=as_json, model_opts=model_opts,
                     started=started)  # fmt: skip
        return
    expected_hash = None
    if from_record is not None:
        if spec is not None:
            raise click.UsageError("--from repeats one edit: give it without --spec")
        images, settings, expected_hash = apply_record(from_record, images, flags=settings, model_opts=model_opts)
    if jobs is not None:
        if images or spec is not None or from_record is not None or shard is not None:
            raise click.UsageError("--jobs - reads every edit from stdin: give no IMAGE, --spec, --from or --shard")
        runner = EditRun(settings, model_opts, True, True, overwrite, started, batch_size=batch_size, jobs=True)
        runner.run_jobs(sys.stdin, output=output, any_output=any_output)
        return
    if not images and spec is None:
        raise click.UsageError("nothing to edit: give IMAGE files or folders, --spec FILE or --from OUTPUT.png")
    _check_edit_prompts(settings, spec)
    items, batch = _collected_items(images, spec, recursive, settings)
    items = plan_edit_outputs(items, output, spec=spec, batch=batch or shard is not None, anywhere=any_output)
    if shard is not None:
        items, model_opts = _this_shard(items, shard, model_opts=model_opts)
    runner = EditRun(settings, model_opts, as_json, batch or shard is not None, overwrite, started, expected_hash,
                     batch_size)  # fmt: skip
    runner.shard = (shard.index, shard.count) if shard is not None and shard.auto else None
    runner.run(items)


def _collected_items(
    images: tuple[Path, ...], spec: Path | None, recursive: bool, settings: EditFlags
) -> tuple[list[Any], bool]:
    """The items to edit (and whether they are a batch), a bad spec or folder as a one-line error."""
    from icdcli.run.batch import SpecError

    try:
        return collect_items(list(images), spec=spec, recursive=recursive, flags=settings)
    except (SpecError, ValueError) as error:
        raise click.ClickException(str(error)) from None


def _check_edit_prompts(settings: EditFlags, spec: Path | None) -> None:
    """--src and --tgt are non-empty when given, and both given unless a --spec's rows give them."""
    for value, flag in ((settings.source, "--src"), (settings.target, "--tgt")):
        if value is not None:
            _check_prompt(value, flag)
    missing = [flag for value, flag in ((settings.source, "--src"), (settings.target, "--tgt")) if value is None]
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


@main.command(
    cls=SectionedCommand,
    sections=[
        (
            "Inversion",
            ["prompt", "output", "reconstruct", "guidance", "tau", "seed", "sampler", "ddim_steps", "as_json"],
        ),
        MODEL_SECTION,
        BACKEND_SECTION,
    ],
    examples=[
        "# latents of cat.jpg, and their decoding with the same prompt to see how faithful it is",
        'icd invert cat.jpg --prompt "a cat" -o cat.latent.safetensors --reconstruct cat-check.png',
        "# then edit them as often as you like: only the decode runs",
        'icd edit --latents cat.latent.safetensors --tgt "a dog" -o dog.png',
    ],
)
@click.argument("image", type=TextPath(path_type=Path))
@click.option("--prompt", required=True, callback=text_callback("prompt"), help="Prompt that describes the image.")
@click.option(
    "-o",
    "--output",
    type=TextPath(),
    default=None,
    help="Latent file to write (.safetensors). Default: IMAGE.latent.safetensors beside the image.",
)
@click.option(
    "--reconstruct",
    type=TextPath(),
    default=None,
    help="Also decode the latent back with the same prompt and write this image.",
)
@click.option(
    "--guidance",
    type=NumberType("guidance"),
    default=1.0,
    show_default=True,
    help="CFG scale of the reconstruction (1 = unguided, the faithful choice).",
)
@click.option(
    "--tau",
    type=NumberType("tau"),
    default=None,
    help="Dynamic guidance of the reconstruction. Default: the model's.",
)
@overwrite_option
@sampler_options
@model_options
@reports_errors
def invert(
    image: Path,
    prompt: str,
    output: str | None,
    reconstruct: str | None,
    guidance: float,
    tau: float | None,
    overwrite: bool,
    seed: int | None,
    sampler: str,
    ddim_steps: int,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Invert IMAGE into noise latents with the forward model (or DDIM on the teacher).

    Writes the inversion as safetensors: the latents, with the model that made them (its hash and
    boundaries), the prompt, seed, sampler and sizes in the metadata. `icd edit --latents FILE --tgt
    ...` edits them with any target, guidance, tau and method (the decode alone; the same pixels as
    a whole edit). --reconstruct decodes them back, which shows how faithful the inversion is.
    """
    started = time.perf_counter()
    _check_prompt(prompt, "--prompt")
    if output is not None and not output.endswith(".safetensors") and not Path(output).is_dir():
        raise click.UsageError(f"-o {output}: the latent file must end in .safetensors")
    if reconstruct is not None and Path(reconstruct).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ""):
        raise click.UsageError(f"--reconstruct {reconstruct}: write a .png (or .jpg, .webp) image")
    with reported_failure(as_json, str(image), output or image.parent / f"{image.stem}.latent.safetensors"):
        latent_path = plan_files([image], output, suffix=".latent.safetensors")[0]
        recon_path = (
            plan_files([image], reconstruct, suffix="-reconstruction.png", flag="--reconstruct")[0]
            if reconstruct
            else None
        )
        for folder in {latent_path.parent, *([recon_path.parent] if recon_path else [])}:
            sweep(folder)
        request = EditRequest("swap", guidance, tau, seed, sampler, ddim_steps)
        _invert(image, prompt, latent_path, recon_path, request, as_json, overwrite, started, model_opts)


def _invert(
    image: Path,
    prompt: str,
    latent_path: Path,
    recon_path: Path | None,
    request: EditRequest,
    as_json: bool,
    overwrite: bool,
    started: float,
    model_opts: dict[str, Any],
) -> None:
    from icdcli.diffusion.editing import INVERSION_FORMAT, Timings, decode, invert_for_edit, save_inversion
    from icdcli.io.images import (
        atomic_path,
        file_sha256,
        load_image,
        original_size,
        probe_image,
        save_image,
        tensor_to_image,
    )
    from icdcli.models.checkpoints import model_files

    probe_image(image)  # an unusable image fails before the model loads
    input_sha = file_sha256(image)
    loaded = load_model(model_opts, need_teacher=request.sampler == "ddim", backend=model_opts["backend"])
    model = loaded.model
    picture = load_image(image, model.info.native_size**2)  # as icd edit reads it, so edits of it are the same
    resolved = request.resolve(model.info)  # the seed of the model's recipe, as icd edit inverts
    settings, seed = resolved.sampling, resolved.seed
    _note_unknown_prompt(model, prompt, "--prompt")
    record = {"command": "invert", **_model_record(loaded), "sampler": settings.sampler,
              "steps": settings.steps(model.info.num_steps), "prompt": prompt, "seed": seed,
              "input": path_from(latent_path, image), "input_sha256": input_sha,
              "input_size": list(original_size(picture)), "format": INVERSION_FORMAT}  # fmt: skip
    latent_skip = check_existing(latent_path, record, fields=LATENT_FIELDS, overwrite=overwrite)
    recon_record: dict[str, Any] = {}
    recon_skip = None
    if recon_path is not None:
        recon_record = {**record, "command": "invert-reconstruct", "guidance": resolved.guidance, "tau": resolved.tau}
        recon_skip = check_existing(
            recon_path, recon_record, fields=RECONSTRUCT_FIELDS, overwrite=overwrite, flag="--reconstruct"
        )
    result: dict[str, Any] = {"input": str(image), "output": str(latent_path), "model": loaded.label,
                              "backend": loaded.backend, "seed": seed}  # fmt: skip
    if recon_path is not None:
        result["reconstruction"] = str(recon_path)
    if latent_skip is not None and (recon_path is None or recon_skip is not None):
        emit(as_json, {"status": "skipped", **result, "reason": latent_skip})
        return
    timings = Timings({"load": loaded.seconds})
    with timings.stage("encode"):
        inversion = invert_for_edit(model, picture, prompt, settings)
    inversion.model = loaded.label
    if recon_path is not None and recon_skip is None:
        with timings.stage("decode"):
            pixels = decode(
                model,
                inversion.latents,
                prompt,
                size=inversion.size,
                guidance=resolved.guidance,
                tau=resolved.tau,
                settings=settings,
            )
            reconstruction = tensor_to_image(pixels, original_size(picture))
    if latent_skip is None:
        with atomic_path(latent_path) as temporary:
            save_inversion(inversion, temporary, record)
    if recon_path is not None and recon_skip is None:
        save_image(reconstruction, recon_path, text=image_text(recon_record, model_files(model)))
    timings.seconds["total"] = time.perf_counter() - started
    result["seconds"] = {k: round(v, 4) for k, v in timings.seconds.items()}
    emit(as_json, {"status": "done", **result})


def _check_output_folder(folder: Path) -> None:
    """The folder an output goes to must exist and be writable (one line saying so otherwise)."""
    try:
        check_writable_folder(folder)
    except OSError as error:
        raise click.ClickException(f"output folder {folder}: {error.strerror or error}; choose another -o") from None


def _memory_budget(device: str) -> int | None:
    """Free memory where the model will run: the GPU's when it runs on one, else the machine's."""
    from icdcli.run.limits import available_bytes

    if device != "cpu" and not device.startswith("mps"):
        import torch

        if torch.cuda.is_available():
            try:
                return torch.cuda.mem_get_info(torch.device(device if device.startswith("cuda") else "cuda"))[0]
            except (RuntimeError, ValueError):
                return None
    return available_bytes()


def _check_size_before_loading(width: int | None, height: int | None, model_opts: dict[str, Any]) -> None:
    """Refuse a size the model cannot take, or this machine cannot hold, before the model loads."""
    from icdcli.run.limits import model_sizes, size_problem

    if width is None and height is None:
        return
    sizes = model_sizes(model_opts["model"], model_opts["base"])
    if sizes is None:  # a preset: known once loaded (_check_size)
        return
    problem = size_problem(width or sizes.native, height or sizes.native, sizes, _memory_budget(model_opts["device"]))
    if problem:
        raise click.UsageError(problem)


def _check_size(size: tuple[int, int], model: Any) -> None:
    from icdcli.run.limits import Sizes, size_problem

    sizes = Sizes(model.info.native_size, model.info.size_multiple, model.vae_scale_factor)
    problem = size_problem(*size, sizes, _memory_budget(str(model.device)))
    if problem:
        raise click.UsageError(problem)


def _note_unknown_prompt(model: Any, prompt: str, flag: str) -> None:
    from icdcli.models.prompts import unknown_prompt_note

    note = unknown_prompt_note(model, prompt, flag)
    if note:
        say(f"note: {note}")


def _model_record(loaded: Any) -> dict[str, Any]:
    """What an output records about the model that made it."""
    from icdcli.models.identity import model_hash

    model = loaded.model
    return {
        "model": loaded.label,
        "model_hash": model_hash(model),
        "backend": loaded.backend,
        "precision": str(model.dtype).removeprefix("torch."),
        "icd_version": __version__,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "image"


@main.command(
    cls=SectionedCommand,
    sections=[
        ("Generation", ["output", "guidance", "tau", "width", "height", "seed", "sampler", "ddim_steps", "as_json"]),
        MODEL_SECTION,
        BACKEND_SECTION,
    ],
    examples=['icd generate "a red circle on a blue background" -o circle.png --seed 3'],
)
@click.argument("prompt", callback=text_callback("prompt"))
@click.option(
    "-o",
    "--output",
    type=TextPath(),
    default=None,
    help="Image to write. Default: a name made from the prompt, in the current folder.",
)
@click.option(
    "--guidance",
    type=NumberType("guidance"),
    default=None,
    help="Classical CFG scale w. Default: the model's (8 for SD).",
)
@click.option(
    "--tau",
    type=NumberType("tau"),
    default=1.0,
    show_default=True,
    help="Dynamic guidance threshold; 1 guides every step.",
)
@click.option(
    "--width",
    type=NumberType("width"),
    default=None,
    help="Width in pixels, a multiple of the model's size step (64 for SD1.5/SDXL, 16 for the embedded model). "
    "Default: the model's native size.",
)
@click.option(
    "--height",
    type=NumberType("height"),
    default=None,
    help="Height in pixels, a multiple of the model's size step. Default: the model's native size.",
)
@overwrite_option
@sampler_options
@model_options
@reports_errors
def generate(
    prompt: str,
    output: str | None,
    guidance: float | None,
    tau: float,
    width: int | None,
    height: int | None,
    overwrite: bool,
    seed: int | None,
    sampler: str,
    ddim_steps: int,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Generate an image from PROMPT in the reverse model's 3-4 steps.

    The PNG records its parameters; an existing file is replaced only with --overwrite (one made with the
    same parameters is skipped).
    """
    started = time.perf_counter()
    _check_prompt(prompt, "PROMPT")
    seed = 0 if seed is None else seed
    default_name = f"{_slug(prompt)}-s{seed}.png"
    target = Path(output) if output is not None else Path(default_name)
    if output is not None and (output.endswith(("/", os.sep)) or target.is_dir()):
        target = target / default_name
    with reported_failure(as_json, prompt, target):
        _check_output_folder(target.parent)
        _check_size_before_loading(width, height, model_opts)
        sweep(target.parent)

        from icdcli.diffusion.editing import SamplerSettings, Timings
        from icdcli.diffusion.editing import generate as run_generate
        from icdcli.io.images import save_image
        from icdcli.models.checkpoints import model_files

        loaded = load_model(model_opts, need_teacher=sampler == "ddim", backend=model_opts["backend"])
        model = loaded.model
        _note_unknown_prompt(model, prompt, "PROMPT")
        size = (width or model.info.native_size, height or model.info.native_size)
        _check_size(size, model)
        w = guidance if guidance is not None else model.info.generate_guidance
        sampling = SamplerSettings(sampler, ddim_steps, seed)
        steps = sampling.steps(model.info.num_steps)
        record = {"command": "generate", **_model_record(loaded), "sampler": sampler, "steps": steps,
                  "prompt": prompt, "guidance": float(w), "tau": float(tau), "seed": seed, "width": size[0],
                  "height": size[1]}  # fmt: skip
        if target.name == default_name and os.path.lexists(target) and existing_record(target) is None:
            target = unique_path(target, set())  # a default name never replaces a file icd did not make
        reason = check_existing(target, record, fields=GENERATE_FIELDS, overwrite=overwrite)
        if reason is not None:
            emit(as_json, {"status": "skipped", "input": prompt, "output": str(target), "reason": reason})
            return
        timings = Timings({"load": loaded.seconds})
        with timings.stage("decode"):
            image = run_generate(model, prompt, guidance=w, tau=tau, settings=sampling, size=size)
        save_image(image, target, text=image_text(record, model_files(model)))
    timings.seconds["total"] = time.perf_counter() - started
    emit(
        as_json,
        {
            "status": "done",
            "input": prompt,
            "output": str(target),
            "model": loaded.label,
            "backend": loaded.backend,
            "seed": seed,
            "seconds": {k: round(v, 4) for k, v in timings.seconds.items()},
        },
    )


@main.group()
def bench() -> None:
    """Measure the model on held-out procedural scenes (the embedded model's world)."""


def bench_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True, help="Held-out scenes."),
        click.option("--batch", type=click.IntRange(min=1), default=50, show_default=True, help="Images per batch."),
        click.option(
            "--seed", type=NumberType("seed"), default=0, show_default=True, help="Seed of the scenes and the noise."
        ),
        click.option("--json", "as_json", is_flag=True, help='Print one JSON object: {"n_images": N, "rows": [...]}.'),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@bench.command("inversion")
@click.option(
    "--variants",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of model variants named like the rows (cd2, cd3, cd4, cd4+lf); --model is cd4+lf+lr.",
)
@click.option(
    "--lpips",
    "lpips_path",
    type=click.Path(path_type=Path),
    default=None,
    help="LPIPS-squeeze weights (a local state dict of lpips.LPIPS(net='squeeze')): adds an lpips column.",
)
@bench_options
@model_options
@reports_errors
def bench_inversion_command(
    variants: Path | None, lpips_path: Path | None, limit: int, batch: int, seed: int, as_json: bool,
    **model_opts: Any,
) -> None:  # fmt: skip
    """Reconstruction quality (MSE, PSNR, SSIM) in the shape of the paper's Table 2.

    Unguided decoding: fDDIM50|DDIM50 on the teacher, fCD|CD with 2, 3 and 4 steps, +L_f, +L_f+L_r.
    Guided decoding at w=8: DDIM50 without and with dynamic guidance, fCD4|CD4 likewise, +L_f,
    +L_f+L_r. Rows whose model variant is absent are listed as skipped.
    """
    need_scikit_image()
    from icdcli.bench.inversion import bench_inversion, load_variants
    from icdcli.bench.scenes import markdown_table
    from icdcli.models.runtime import load_model_folder

    model = load_model(model_opts, need_teacher=True).model
    found = load_variants(variants, lambda path: load_model_folder(path).to(model.device, model.dtype))
    found.setdefault("cd4+lf+lr", model)
    lpips = None
    if lpips_path is not None:
        from icdcli.pie.networks import load_lpips

        lpips = load_lpips(lpips_path)
    teacher = model if model.teacher_unet is not None else None
    result = bench_inversion(found, teacher, count=limit, batch=batch, seed=seed, progress=say, lpips=lpips)
    if as_json:
        click.echo(strict_json(result))
        return
    click.echo(markdown_table(result["rows"], ["config", "mse", "psnr", "ssim"] + (["lpips"] if lpips else [])))
    if result["skipped"]:
        click.echo(f"\nskipped (no such variant): {', '.join(result['skipped'])}")


@bench.command("shapes-edit")
@click.option(
    "--method",
    type=click.Choice(["all", "swap", "p2p"]),
    default="all",
    show_default=True,
    help="Editing methods to compare: prompt swap, Prompt-to-Prompt, or both.",
)
@bench_options
@model_options
@reports_errors
def bench_shapes_edit_command(method: str, limit: int, batch: int, seed: int, as_json: bool, **model_opts: Any) -> None:
    """Edit held-out scenes to a copy with one attribute changed and compare with its exact rendering.

    For each kind (colour, shape, background): PSNR to the target, PSNR of the unchanged region to
    the source, and attribute accuracy. Methods: icd4-swap and icd4-p2p (the model: prompt swap and
    Prompt-to-Prompt with the model's edit recipe), ddim50-swap and ddim50-p2p (its teacher: DDIM50
    inversion, then 50 steps at w=8), icd4-p2p-blend (icd4-p2p with local blend on the edited word).
    Then, per kind of caption word (the shape's colour, the shape, the background's colour), how well
    its cross-attention map, as local blend thresholds it, covers its region (IoU).
    """
    from icdcli.bench.scenes import markdown_table
    from icdcli.bench.shapes_edit import EDIT_METHODS, bench_shapes_edit

    model = load_model(model_opts, need_teacher=True).model
    methods = tuple(m for m in EDIT_METHODS if method in ("all", m.editing))
    result = bench_shapes_edit(model, count=limit, batch=batch, seed=seed, methods=methods, progress=say)
    if as_json:
        click.echo(strict_json(result))
        return
    click.echo(markdown_table(result["rows"], ["method", "kind", "psnr_target", "psnr_background", "accuracy"]))
    click.echo("\n" + markdown_table(result["localisation"], ["word_kind", "iou", "localised", "region"]))


@bench.command("latency")
@click.option("--limit", type=click.IntRange(min=1), default=5, show_default=True, help="Timed edits per row.")
@click.option("--size", type=click.IntRange(min=8), default=None, help="Image side in pixels. Default: the model's.")
@click.option(
    "--backends", default="torch,onnxruntime,tensorrt", show_default=True, help="Comma-separated backends to time."
)
@click.option("--json", "as_json", is_flag=True, help='Print one JSON object: {"device", "rows", "speedup"}.')
@model_options
@reports_errors
def bench_latency_command(limit: int, size: int | None, backends: str, as_json: bool, **model_opts: Any) -> None:
    """Seconds per edit on each backend: iCD by prompt swap and by Prompt-to-Prompt, and the 50-step baseline
    (DDIM inversion + 50 guided steps) with the teacher as it is and under real classifier-free guidance.

    Each row is the median of --limit whole edits after a warm-up, the rows timed in interleaved rounds
    (so drift of the machine shifts every row alike); exports and engine builds happen before timing.
    Backends that cannot run here are skipped with the reason. Time on an idle machine.
    """
    from icdcli.bench.latency import measure_latency

    model = load_model(model_opts, need_teacher=True).model
    result = measure_latency(
        model, [b.strip() for b in backends.split(",") if b.strip()], repeats=limit, size=size, progress=say
    )
    if as_json:
        click.echo(strict_json(result))
        return
    from icdcli.bench.scenes import markdown_table

    click.echo(f"device: {result['device']}; model {result['model']}; image {result['image']}")
    click.echo(markdown_table(result["rows"], ["backend", "method", "seconds_per_edit"]))
    for name, value in {**result["speedup"], **result["overhead"]}.items():
        click.echo(f"{name}: {value:.2f}x")
    for name, reason in result["skipped"].items():
        click.echo(f"skipped {name}: {reason}")


def _torch_build() -> dict[str, str | None] | None:
    """torch's version and the GPU toolkit it was built for, read from `torch/version.py` without importing torch
    (which takes seconds); None when torch is not installed, empty when the file cannot be read."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    facts: dict[str, str | None] = {}
    try:
        tree = ast.parse((Path(spec.origin).parent / "version.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            facts[target.id] = value.value if isinstance(value.value, str) or value.value is None else None
    return facts


def _gpu_report(build: dict[str, str | None] | None) -> dict[str, Any]:
    """CUDA as torch sees it. A CPU-only torch build cannot use a GPU, so torch is imported (seconds) only for a
    CUDA or ROCm build, to ask the driver for its devices."""
    if build is None or (build and build.get("cuda") is None and build.get("hip") is None):
        return {"available": False, "version": None, "devices": []}
    import torch

    return {
        "available": torch.cuda.is_available(),
        "version": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def _exports_and_engines() -> dict[str, Any]:
    try:
        from icdcli.cli.export import describe_cache

        return describe_cache()
    except ImportError as error:  # a source tree run without installing: icdcli.export is not mapped
        return {"onnx": [], "engines": [], "unreadable": f"{error} (pip install -e . maps icdcli.export)"}


def _hub_report() -> dict[str, Any]:
    """Where the Hugging Face hub cache is and whether icd may use the network (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    from icdcli.models.hub import endpoint, offline

    return {"cache": str(constants.HF_HUB_CACHE), "offline": offline(),
            "offline_reason": "HF_HUB_OFFLINE is set" if offline() else None, "endpoint": endpoint()}  # fmt: skip


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(as_json: bool) -> None:
    """Show the version, torch and CUDA, which backends can run, where models are cached, where the Hugging Face
    hub cache is and whether it is offline, and the presets of the released checkpoints with their edit recipes
    and whether their files are present."""
    import importlib.metadata
    import importlib.util
    import platform

    from icdcli.core.paths import MODEL_JSON, cache_root
    from icdcli.models.sources import DEFAULT_MODEL_DIR, PRESETS, preset_files_report

    def version_of(distribution: str) -> str | None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    report: dict[str, Any] = {"icd": __version__, "python": platform.python_version()}
    build = _torch_build()
    report["torch"] = (build or {}).get("__version__") or version_of("torch")
    report["cuda"] = _gpu_report(build)
    backends = {"torch": {"importable": report["torch"] is not None, "version": report["torch"]}}
    for name, module, distribution in (
        ("onnxruntime", "onnxruntime", "onnxruntime"),
        ("onnxruntime-gpu", "onnxruntime", "onnxruntime-gpu"),
        ("tensorrt", "tensorrt", "tensorrt"),
    ):
        version = version_of(distribution)
        backends[name] = {
            "importable": version is not None and importlib.util.find_spec(module) is not None,
            "version": version,
        }
    report["backends"] = backends
    cache = cache_root()
    merged = sorted(p.name for p in (cache / "merged").iterdir()) if (cache / "merged").is_dir() else []
    report["cache"] = {"root": str(cache), "fused_models": merged, **_exports_and_engines()}
    report["default_model"] = str(DEFAULT_MODEL_DIR) if (DEFAULT_MODEL_DIR / MODEL_JSON).is_file() else None
    report["hub"] = _hub_report()
    report["presets"] = [{**preset.to_json(), "files": preset_files_report(preset)} for preset in PRESETS.values()]
    if as_json:
        click.echo(strict_json(report, indent=2))
        return
    click.echo(f"icd {report['icd']} (python {report['python']}, torch {report['torch']})")
    cuda = report["cuda"]
    click.echo(f"CUDA: {'yes, ' + ', '.join(cuda['devices']) if cuda['available'] else 'not available'}")
    for name, entry in backends.items():
        click.echo(f"backend {name}: {'yes ' + entry['version'] if entry['importable'] else 'not installed'}")
    click.echo(f"cache: {cache} ({len(merged)} fused models)")
    for entry in report["cache"].get("onnx", []):
        click.echo(f"  onnx export: {entry['path']} ({entry['model']}, {entry['precision']})")
    for entry in report["cache"].get("engines", []):
        click.echo(f"  tensorrt engine: {entry.get('path', entry)}")
    click.echo(f"default model: {report['default_model'] or 'not embedded in this installation'}")
    hub = report["hub"]
    state = f"offline: {hub['offline_reason']}" if hub["offline"] else f"online, {hub['endpoint']}"
    click.echo(f"hub cache: {hub['cache']} ({state})")
    for preset in report["presets"]:
        p2p = f", p2p cross {preset['cross_replace']} self {preset['self_replace']} amplify {preset['amplify']}"
        files = preset["files"]
        present = "all present" if files["present"] else f"missing {len(files['missing'])} of {files['total']}"
        teacher = " (+ the teacher, given with --teacher)" if files["needs_teacher_flag"] else ""
        click.echo(
            f"preset {preset['name']}: {preset['description']}\n  edits with {preset['method']}, guidance "
            f"{preset['guidance']:g} (the release's {preset['guidance'] - 1:g}), tau {preset['tau']}"
            f"{p2p if preset['method'] == 'p2p' else ''}, seed {preset['seed']}\n  files: {present}{teacher}"
        )


main.add_command(_export_command)
main.add_command(_cache_command)
main.add_command(_train_command)
bench.add_command(_pie_command)
bench.add_command(_throughput_command)
bench.add_command(_scale_command)
bench.add_command(_gpu_command)
