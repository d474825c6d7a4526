"""`icd invert`: a photo into the latents `icd edit --latents` edits, and optionally their reconstruction."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from icdcli.cli.common import check_prompt, load_model, model_record, note_unknown_prompt, reports_errors
from icdcli.cli.console import console_options
from icdcli.cli.options import (
    BACKEND_SECTION,
    MODEL_SECTION,
    NumberType,
    SectionedCommand,
    TextPath,
    model_options,
    overwrite_option,
    sampler_options,
    text_callback,
)
from icdcli.cli.results import emit, reported_failure
from icdcli.diffusion.recipe import EditRequest
from icdcli.io.claims import sweep
from icdcli.run.outputs import LATENT_FIELDS, RECONSTRUCT_FIELDS, check_existing, image_text, path_from
from icdcli.run.planning import plan_files


@click.command(
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
@console_options
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
    check_prompt(prompt, "--prompt")
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
    from icdcli.editing.generation import decode
    from icdcli.editing.inversion import INVERSION_FORMAT, invert_for_edit, save_inversion
    from icdcli.editing.stages import Timings
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
    note_unknown_prompt(model, prompt, "--prompt")
    record = {"command": "invert", **model_record(loaded), "sampler": settings.sampler,
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
