"""`icd edit --latents FILE`: a new target on a saved inversion (`icd invert`), the decode alone."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from icdcli.core.errors import ICDError, ICDUsageError
from icdcli.run.inputs import EditFlags
from icdcli.run.model import ModelIdentity, ModelLoader
from icdcli.run.outputs import image_text, path_from, recorded_path
from icdcli.run.planning import edit_name, output_target
from icdcli.run.records import edit_record, file_record, match_fields
from icdcli.run.report import Reporter


def latents_output(latents: Path, output: str | None, variant: int | None = None, suffix: str = ".png") -> Path:
    """Where `icd edit --latents FILE` writes: -o (a file, or a folder to write into), else beside FILE, named
    after it (`cat.latent.safetensors` -> `cat-edit.png`; the Nth of several targets `cat-edit-N.png`)."""
    name = latents.name
    for ending in (".latent.safetensors", ".safetensors"):
        if name.endswith(ending) and len(name) > len(ending):
            name = name[: -len(ending)]
            break
    default = edit_name(name, variant, suffix)
    if output is None:
        return latents.parent / default
    if variant is not None:  # several targets: -o is a folder (the command line refuses a file's name)
        return Path(output) / default
    return Path(output) / default if Path(output).is_dir() else Path(output)


def latents_mask(
    mask: Path | None, outs: list[Path], inversion: Any, photo: Path, size: tuple[int, int], reporter: Reporter
) -> tuple[Any, str | None]:
    """The mask of `icd edit --latents FILE --mask MASK` at the photo's size and its digest ((None, None): no mask).
    The photo's own pixels, which the result keeps outside the mask, come from the inverted file when it is still
    there unchanged (`inversion.image`); else a note says the result keeps the VAE's rendering of them there."""
    from icdcli.io.images import file_sha256, load_image, load_mask
    from icdcli.run.batch import display

    if mask is None:
        return None, None
    for out in outs:
        if os.path.realpath(out) == os.path.realpath(mask):
            raise ICDUsageError(f"-o {display(out)} is the mask: choose another name, inputs are never replaced")
    try:
        fitted, digest = load_mask(mask, size), file_sha256(mask)
    except ICDError as error:
        raise ICDError(f"mask {error}") from None
    except OSError as error:
        raise ICDError(f"mask {display(mask)}: cannot be read ({error.strerror or error})") from None
    recorded = inversion.record.get("input_sha256")
    try:
        same = photo.is_file() and recorded is not None and file_sha256(photo) == recorded
        inversion.image = load_image(photo) if same else None
    except (ICDError, OSError):
        inversion.image = None
    if inversion.image is None:
        reporter.say(f"note: the inverted photo {display(photo)} is not there as it was inverted: outside the mask "
                     "the result keeps the VAE's rendering of it, not its own pixels")  # fmt: skip
    return fitted, digest


def edit_latents(
    latents: Path,
    flags: EditFlags,
    *,
    output: str | None,
    overwrite: bool,
    load: ModelLoader,
    reporter: Reporter,
    started: float,
    targets: Sequence[str] = (),
) -> None:
    """Decode a saved inversion under the target prompt, with any guidance, tau, method and P2P settings; the
    output's record is the one a whole edit of the same input with the same settings writes (its pixels are the
    same), plus the latent file it came from (`latents`). The source prompt, seed and sampler are the inversion's
    (ICDUsageError for flags that ask for others).

    Args:
        load: loads the model (`icdcli.run.model.ModelLoader`), once the inversion and flags are checked.
        reporter: hears each result (`Reporter.result`) and notes.
        targets: several target prompts, decoded one after another into `NAME-edit-1.png`, ...; none: the flags'.
    """
    from icdcli.diffusion.recipe import P2PError
    from icdcli.editing.inversion import InversionError, edit_inversion, load_inversion
    from icdcli.editing.stages import Timings
    from icdcli.io.images import OUTPUT_SUFFIXES, input_exif, read_record, save_image
    from icdcli.models.prompts import unknown_prompt_note
    from icdcli.run.batch import decide, display

    try:
        inversion = load_inversion(latents)
    except InversionError as error:
        raise ICDError(f"--latents {error}") from None
    targets = list(targets) if len(targets) > 1 else [flags.target] if flags.target is not None else []
    if not targets:
        raise ICDUsageError("--tgt is needed: --latents holds the source prompt, --tgt describes the result")
    if flags.source is not None and flags.source != inversion.prompt:
        raise ICDUsageError(
            f"--src {flags.source!r} is not the prompt the latents were inverted with ({inversion.prompt!r}): leave "
            "--src out, or invert the image again with icd invert --prompt"
        )
    request = flags.request
    made = inversion.settings
    if request.seed is not None and request.seed != made.seed:
        raise ICDUsageError(
            f"--seed {request.seed}: the latents were inverted with seed {made.seed}; leave --seed out, or invert "
            "the image again with icd invert --seed"
        )
    if "sampler" not in flags.given:  # the inversion's sampler (and DDIM steps) unless one is asked for
        request = replace(request, sampler=made.sampler, ddim_steps=made.ddim_steps)
    request = replace(request, seed=made.seed)
    several = len(targets) > 1
    if several and output is not None:  # a folder, made when its parent is there
        output_target(output, [latents], single=False)
    outs = [latents_output(latents, output, number if several else None, flags.suffix)
            for number in range(1, len(targets) + 1)]  # fmt: skip
    if outs[0].suffix.lower() not in OUTPUT_SUFFIXES:
        raise ICDUsageError(f"-o {outs[0]}: write an image ({', '.join(sorted(OUTPUT_SUFFIXES))})")
    loaded = load(request.sampler == "ddim")
    model = loaded.model
    try:
        resolved = request.resolve(model.info)
    except ValueError as error:  # P2PError: values the model's recipe and the flags cannot combine
        raise ICDError(str(error)) from None
    identity = ModelIdentity.of(loaded)
    recorded = inversion.record
    image_path = recorded_path(latents, str(recorded["input"])) if recorded.get("input") else latents
    input_size = recorded.get("input_size") or list(inversion.original_size)
    mask, mask_sha = latents_mask(flags.mask, outs, inversion, image_path, tuple(input_size), reporter)
    for target, out in zip(targets, outs, strict=True):
        wanted = edit_record(resolved, identity, src=inversion.prompt, tgt=target, output=out, image=image_path,
                             input_size=tuple(input_size), input_sha256=str(recorded.get("input_sha256", "")),
                             p2p=resolved.p2p if resolved.method == "p2p" else None, unguided=flags.unguided,
                             mask=flags.mask if mask is not None else None, mask_sha256=mask_sha)  # fmt: skip
        wanted.update(latents=path_from(out, latents), **file_record(out, quality=flags.quality))
        exists = os.path.lexists(out)
        existing = read_record(out) if exists and not overwrite else None
        decision = decide(exists, existing, wanted, overwrite=overwrite, fields=match_fields())
        result: dict[str, Any] = {"input": str(latents), "output": str(out), "model": loaded.label,
                                  "backend": loaded.backend, "seed": resolved.seed}  # fmt: skip
        if decision.action == "refuse":
            raise ICDError(f"{display(out)} {decision.reason}")
        if decision.action == "skip":
            reporter.result({"status": "skipped", **result, "reason": decision.reason})
            continue
        note = unknown_prompt_note(model, target, "--tgt")
        if note:
            reporter.say(f"note: {note}")
        timings = Timings({"load": loaded.seconds})
        try:
            edited = edit_inversion(model, inversion, target, guidance=resolved.guidance, tau=resolved.tau,
                                    settings=resolved.sampling, p2p=resolved.p2p, unguided=flags.unguided or "source",
                                    timings=timings, mask=mask)  # fmt: skip
        except InversionError as error:
            raise ICDError(f"--latents {display(latents)}: {error} (icd invert IMAGE --prompt ...)") from None
        except P2PError as error:
            raise ICDError(str(error)) from None
        if list(edited.size) != list(input_size):
            from PIL import Image

            edited = edited.resize((int(input_size[0]), int(input_size[1])), Image.Resampling.LANCZOS)
        with timings.stage("write"):
            exif = input_exif(image_path) if flags.keep_exif and image_path.is_file() else None
            save_image(edited, out, text=image_text(wanted, identity.files), exif=exif, quality=flags.quality)
        timings.seconds["total"] = time.perf_counter() - started
        started = time.perf_counter()  # the next target's total runs from here
        reporter.result({"status": "done", **result, "method": resolved.method, "guidance": resolved.guidance,
                         "tau": resolved.tau, "src": inversion.prompt, "tgt": target,
                         "seconds": {k: round(v, 4) for k, v in timings.seconds.items()}})  # fmt: skip
