"""`icd bench pie`: edit a PIE-Bench-format folder with one model and score the results.

Registered on the `bench` group by `icdcli.cli.bench`. Heavy imports (torch, transformers) happen inside the command.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from icdcli.cli.common import load_model, need_scikit_image, reports_errors
from icdcli.cli.console import console, console_options, say
from icdcli.cli.options import (
    TextPath,
    batch_size_option,
    blend_keep_option,
    edit_guidance_options,
    model_options,
    p2p_step_options,
    replace_tail_option,
    sampler_options,
    text_callback,
)

if TYPE_CHECKING:
    from icdcli.diffusion.recipe import ResolvedEdit
    from icdcli.run.report import RunEnd


def default_out(root: Path) -> Path:
    """PIE-Bench's evaluation reads `data/` and `output/<method>/annotation_images` side by side."""
    return root.resolve().parent / "output"


def _check_p2p() -> None:
    try:
        from icdcli.diffusion.p2p import plan  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "--method p2p needs Prompt-to-Prompt (icdcli.diffusion.p2p), which this icd lacks: use --method swap, "
            "or update icd"
        ) from None


def _chosen_items(root: Path, types: tuple[str, ...], limit: int | None) -> tuple[list, set[str] | None]:
    """The items of --types (None: every type), the first --limit of them; a one-line error when none is left."""
    from icdcli.pie.dataset import parse_types, read_mapping, select_items

    try:
        chosen_types = parse_types(types)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    items = select_items(read_mapping(root), chosen_types, limit)
    if not items:
        raise click.ClickException(f"no items of types {','.join(sorted(chosen_types or []))} in {root}: check --types")
    return items, chosen_types


def _run_folder(
    root: Path, out: Path | None, name: str | None, settings: ResolvedEdit, num_steps: int, masked: bool = False
) -> Path:
    """OUT/NAME, refused when it is the benchmark folder itself."""
    from icdcli.pie.dataset import method_name

    sampling = settings.sampling
    run_name = name or method_name(sampling.sampler, sampling.steps(num_steps), settings.method)
    if name is None and settings.p2p is not None and settings.p2p.blend_keep != "source":
        run_name += f"-keep-{settings.p2p.blend_keep}"
    if name is None and masked:
        run_name += "-mask"
    folder = (out if out is not None else default_out(root)) / run_name
    if folder.resolve() == root.resolve():
        raise click.ClickException("--out and --name point at --root: its images would be replaced; choose another")
    return folder


def _score_all(items: list, root: Path, folder: Path, scorers: Any) -> list[dict[str, Any]]:
    """The metrics of every item's output, with a progress bar on a terminal."""
    from tqdm import tqdm

    from icdcli.pie.scoring import score_item

    disable = console().bars_disabled
    bar = tqdm(items, desc="scoring", unit="image", file=sys.stderr, disable=disable, dynamic_ncols=True)
    return [score_item(item, root, folder, scorers) for item in bar]


def _subfolder_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--name: one folder's name inside --out, never a path that leaves it."""
    value = text_callback("path")(ctx, param, value)
    if value is not None and (value in ("", ".", "..") or "/" in value or "\\" in value):
        raise click.BadParameter(f"{value!r} is not a folder name: give a name for this run's folder in --out "
                                 "(no / or ..)", ctx, param)  # fmt: skip
    return value


@click.command("pie")
@click.option(
    "--root",
    required=True,
    type=TextPath(file_okay=False, path_type=Path),
    help="PIE-Bench-format folder: mapping_file.json and annotation_images/.",
)
@click.option(
    "--out",
    type=TextPath(file_okay=False, path_type=Path),
    default=None,
    help="Results folder: OUT/NAME/annotation_images/<image_path>, metrics.json, metrics.md. Default: output/ "
    "beside ROOT, where PIE-Bench's evaluation script looks (its data/ and output/ are siblings).",
)
@click.option(
    "--name",
    default=None,
    callback=_subfolder_name,
    help="This run's subfolder of --out (a name, not a path). Default: <sampler><steps>-<method>.",
)
@click.option(
    "--types",
    multiple=True,
    metavar="IDS",
    help="Editing types to run (editing_type_id 0..9), comma-separated or repeated. Default: all.",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N chosen items (by id).")
@click.option(
    "--method",
    type=click.Choice(["swap", "p2p"]),
    default="swap",
    show_default=True,
    help="swap: decode with the target prompt (the source prompt at the unguided steps). p2p: Prompt-to-Prompt "
    "with the model's recipe, local blend on each blended_word (its source word in the source prompt, its target "
    "word in the target prompt).",
)
@edit_guidance_options
@p2p_step_options
@replace_tail_option
@blend_keep_option
@click.option(
    "--mask",
    "masked",
    is_flag=True,
    help="Hold each edit to its annotated region (the item's mask, as icd edit --mask holds an edit): outside it the "
    "result keeps the photo's own pixels. The run's default NAME gets -mask.",
)
@click.option("--overwrite", is_flag=True, help="Edit again items whose output exists (made with other settings).")
@batch_size_option
@click.option(
    "--lpips",
    "lpips_path",
    type=TextPath(dir_okay=False, path_type=Path),
    default=None,
    help="LPIPS weights: the state dict of lpips.LPIPS(net='squeeze') (.pth or .safetensors). Without: skipped.",
)
@click.option(
    "--dino",
    "dino_path",
    type=TextPath(file_okay=False, path_type=Path),
    default=None,
    help="Local transformers copy of facebook/dino-vitb8, for the structure distance. Without: skipped.",
)
@click.option(
    "--clip",
    "clip_path",
    type=TextPath(file_okay=False, path_type=Path),
    default=None,
    help="Local transformers copy of openai/clip-vit-large-patch14, for CLIP scores. Without: skipped.",
)
@sampler_options
@model_options
@console_options
@reports_errors
def pie(
    root: Path,
    out: Path | None,
    name: str | None,
    types: tuple[str, ...],
    limit: int | None,
    method: str,
    guidance: float | None,
    tau: float | None,
    cross_replace: float | None,
    self_replace: float | None,
    replace_tail: str,
    blend_keep: str,
    masked: bool,
    overwrite: bool,
    batch_size: int | None,
    lpips_path: Path | None,
    dino_path: Path | None,
    clip_path: Path | None,
    seed: int | None,
    sampler: str,
    ddim_steps: int,
    backend: str,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Run a PIE-Bench-format benchmark: edit every item, then score the results.

    Outputs keep the benchmark's layout (OUT/NAME/annotation_images/<image_path>) and carry their
    parameters, so a rerun skips what is finished. Background PSNR, MSE and SSIM always run; LPIPS,
    structure distance and CLIP scores run when their local weights are given. Prints Markdown
    tables per editing type and overall (--json: the whole report as one JSON object) and writes
    them to metrics.md and metrics.json beside the outputs. Ctrl-C stops after the current batch and
    scores what is finished (exit code 130).
    """
    from icdcli.diffusion.recipe import EditRequest, P2POptions
    from icdcli.pie.editing import edit_items
    from icdcli.pie.report import edits_section
    from icdcli.pie.scoring import load_scorers
    from icdcli.run.inputs import EditFlags

    need_scikit_image()
    started = time.perf_counter()
    items, chosen_types = _chosen_items(root, types, limit)
    if method == "p2p":
        _check_p2p()
    scorers = load_scorers(lpips_path, dino_path, clip_path)
    p2p = P2POptions(
        cross_replace=cross_replace, self_replace=self_replace, replace_tail=replace_tail, blend_keep=blend_keep
    )
    flags = EditFlags(None, None, EditRequest(method, guidance, tau, seed, sampler, ddim_steps, p2p))
    loaded = load_model(model_opts, need_teacher=sampler == "ddim", backend=backend)
    info = loaded.model.info
    settings = flags.request.resolve(info)
    folder = _run_folder(root, out, name, settings, info.num_steps, masked)
    edit_started = time.perf_counter()
    outcomes, end = edit_items(
        items, root, folder, flags=flags, loaded=loaded, overwrite=overwrite, batch_size=batch_size, masked=masked
    )
    edit_seconds = time.perf_counter() - edit_started
    if end.interrupted:
        console().error("interrupted: scoring what is finished (finished outputs will be skipped next time)")
    facts = {"root": str(root), "output": str(folder), "model": loaded.label, "backend": loaded.backend,
             **settings.record(info.num_steps), "types": sorted(chosen_types) if chosen_types else None,
             "mask": masked}  # fmt: skip
    if settings.p2p is not None:
        facts["replace_tail"] = settings.p2p.replace_tail
        facts["blend_keep"] = settings.p2p.blend_keep
    scores, markdown = _score(items, outcomes, root=root, folder=folder, scorers=scorers)
    edits = edits_section(outcomes, total=len(items), seconds=edit_seconds, load_seconds=loaded.seconds)
    seconds = round(time.perf_counter() - started, 3)
    report = {**facts, "n_items": len(items), "edits": edits, **scores, "seconds": seconds}
    _publish(folder, report, markdown, as_json)
    _finish(end, report)


def _score(items: list, outcomes: list, *, root: Path, folder: Path, scorers: Any) -> tuple[dict[str, Any], str]:
    """Score every finished output: the report's metrics, means and failures, and its Markdown tables."""
    from icdcli.pie.report import failures, markdown_tables
    from icdcli.pie.scoring import present_metrics, summarise

    finished = {o.key for o in outcomes if o.status in ("done", "skipped")}
    rows = _score_all([item for item in items if item.key in finished], root, folder, scorers)
    metrics = present_metrics(scorers)
    summary = summarise(rows, metrics)
    scores = {"metrics": metrics, "skipped_metrics": scorers.skipped, **summary, "failed": failures(outcomes, rows),
              "items": rows}  # fmt: skip
    return scores, markdown_tables(summary, metrics, scorers.skipped)


def _publish(folder: Path, report: dict[str, Any], markdown: str, as_json: bool) -> None:
    """Write metrics.json and metrics.md beside the outputs; print the report (--json) or the tables."""
    from icdcli.pie.report import write_report

    json_path, markdown_path = write_report(folder, report, markdown)
    if as_json:
        console().json(report)
    else:
        console().report(markdown)
    edits = report["edits"]
    say(
        f"{edits['done']} edited, {edits['skipped']} already there, {edits['failed']} failed; "
        f"report: {markdown_path} and {json_path.name}"
    )


def _finish(end: RunEnd, report: dict[str, Any]) -> None:
    """Exit as the run ended: 130 (143 for SIGTERM) after a stop, 1 after a failure."""
    if end.interrupted:
        sys.exit(end.code)
    if end.stopped:
        raise click.ClickException("stopped: fix the error above and run again; finished outputs will be skipped")
    if report["failed"]:
        failed, total = len(report["failed"]), report["n_items"]
        raise click.ClickException(f"{failed} of {total} items failed (see the errors above)")


for _param in pie.params:  # the shared --json option says "one object per output"; here it is one report
    if _param.name == "as_json":
        _param.help = "Print the whole report (tables per editing type and overall) as one JSON object on stdout."
