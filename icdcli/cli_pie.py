"""`icd bench pie`: edit a PIE-Bench-format folder with one model and score the results.

Registered on the `bench` group in cli.py. Heavy imports (torch, transformers) happen inside the command.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from .cli_common import (
    _load,
    _reports_errors,
    _say,
    edit_guidance_options,
    model_options,
    need_scikit_image,
    p2p_step_options,
    sampler_options,
)


def _edit_function(method: str, model: Any, plan: Any) -> Any:
    """(image, item, timings) -> edited image, for prompt swap or Prompt-to-Prompt."""
    from .editing import SamplerSettings, edit
    from .errors import ICDError

    settings = SamplerSettings(plan.sampler, plan.steps if plan.sampler == "ddim" else 50, plan.seed)

    def run(image: Any, item: Any, timings: Any) -> Any:
        prompts = (item.source_prompt, item.target_prompt)
        if method == "swap":
            return edit(model, image, *prompts, plan.guidance, plan.tau, settings, timings)
        from .p2p import P2PError  # checked present before the model loads

        try:
            return edit(model, image, *prompts, plan.guidance, plan.tau, settings, timings, plan.p2p_for(item))
        except P2PError as error:  # prompts or blend words P2P cannot use: this item fails, the run goes on
            raise ICDError(f"{item.key}: {error}") from None

    return run


def default_out(root: Path) -> Path:
    """PIE-Bench's evaluation reads `data/` and `output/<method>/annotation_images` side by side."""
    return root.resolve().parent / "output"


def _check_p2p() -> None:
    try:
        from .p2p import P2PSettings  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "--method p2p needs Prompt-to-Prompt (icdcli.p2p), which this icd lacks: use --method swap, or update icd"
        ) from None


def _edit_all(
    items: list, root: Path, folder: Path, record_for: Any, edit: Any, overwrite: bool
) -> tuple[list, str | None]:
    """Every item's Outcome in order, and why the run stopped early: None, "interrupted" (Ctrl-C) or "stopped"."""
    from tqdm import tqdm

    from .pie import StopRun, edit_item

    outcomes = []
    bar = tqdm(total=len(items), desc="editing", unit="image", file=sys.stderr, disable=None, dynamic_ncols=True)
    try:
        for item in items:
            outcome = edit_item(item, root, folder, record_for, edit, overwrite)
            outcomes.append(outcome)
            if outcome.status == "failed":
                bar.write(f"Error: {item.key}: {outcome.error}", file=sys.stderr)
            bar.update(1)
    except StopRun as error:
        bar.write(f"Error: {error}", file=sys.stderr)
        return outcomes, "stopped"
    except KeyboardInterrupt:
        bar.write("interrupted: scoring what is finished (finished outputs will be skipped next time)", file=sys.stderr)
        return outcomes, "interrupted"
    finally:
        bar.close()
    return outcomes, None


def _score_all(items: list, root: Path, folder: Path, scorers: Any) -> list[dict[str, Any]]:
    """The metrics of every item's output, with a progress bar on a terminal."""
    from tqdm import tqdm

    from .pie import score_item

    bar = tqdm(items, desc="scoring", unit="image", file=sys.stderr, disable=None, dynamic_ncols=True)
    return [score_item(item, root, folder, scorers) for item in bar]


@click.command("pie")
@click.option(
    "--root",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="PIE-Bench-format folder: mapping_file.json and annotation_images/.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Results folder: OUT/NAME/annotation_images/<image_path>, metrics.json, metrics.md. Default: output/ "
    "beside ROOT, where PIE-Bench's evaluation script looks (its data/ and output/ are siblings).",
)
@click.option("--name", default=None, help="This run's subfolder of --out. Default: <sampler><steps>-<method>.")
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
@click.option("--overwrite", is_flag=True, help="Edit again items whose output exists (made with other settings).")
@click.option(
    "--lpips",
    "lpips_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="LPIPS weights: the state dict of lpips.LPIPS(net='squeeze') (.pth or .safetensors). Without: skipped.",
)
@click.option(
    "--dino",
    "dino_path",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Local transformers copy of facebook/dino-vitb8, for the structure distance. Without: skipped.",
)
@click.option(
    "--clip",
    "clip_path",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Local transformers copy of openai/clip-vit-large-patch14, for CLIP scores. Without: skipped.",
)
@sampler_options
@model_options
@_reports_errors
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
    overwrite: bool,
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
    them to metrics.md and metrics.json beside the outputs.
    """
    from . import __version__
    from .batch import model_digest, model_weight_sizes, parameter_record
    from .pie import (
        EditPlan,
        load_scorers,
        markdown_tables,
        method_name,
        parse_types,
        present_metrics,
        read_mapping,
        select_items,
        summarise,
        wanted_record,
        write_report,
    )

    need_scikit_image()
    started = time.perf_counter()
    try:
        chosen_types = parse_types(types)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    items = select_items(read_mapping(root), chosen_types, limit)
    if not items:
        raise click.ClickException(f"no items of types {','.join(sorted(chosen_types or []))} in {root}: check --types")
    if method == "p2p":
        _check_p2p()
    scorers = load_scorers(lpips_path, dino_path, clip_path)
    loaded = _load(model_opts, need_teacher=sampler == "ddim", backend=backend)
    model = loaded.model
    steps = model.info.num_steps if sampler == "icd" else ddim_steps
    from .recipe import guidance_and_tau

    guidance, tau = guidance_and_tau(model.info, sampler, guidance, tau)
    seed = model.info.edit.seed if seed is None else seed
    p2p = None
    if method == "p2p":
        from .recipe import P2POptions

        try:
            p2p = P2POptions(cross_replace=cross_replace, self_replace=self_replace).resolve(model.info.edit)
        except ValueError as error:
            raise click.ClickException(str(error)) from None
    plan = EditPlan(method, sampler, steps, float(guidance), float(tau), seed, p2p)
    folder = (out if out is not None else default_out(root)) / (name or method_name(sampler, steps, method))
    if folder.resolve() == root.resolve():
        raise click.ClickException("--out and --name point at --root: its images would be replaced; choose another")
    label = loaded.label
    model_ref = str(Path(label).resolve()) if Path(label).is_dir() else label
    model_hash = model_digest(model.info.to_json(), model_weight_sizes(model))

    def record_for(item: Any, source: Path, sha: str, size: tuple[int, int]) -> dict[str, Any]:
        base = parameter_record(
            model=model_ref, model_hash=model_hash, backend=loaded.backend,
            precision=str(model.dtype).removeprefix("torch."), sampler=sampler, steps=steps, src=item.source_prompt,
            tgt=item.target_prompt, guidance=plan.guidance, tau=plan.tau, seed=seed, version=__version__,
            input_path=str(source.absolute()), input_size=size, input_sha256=sha, method=method,
            p2p=plan.p2p_record(item),
        )  # fmt: skip
        return wanted_record(base, item)

    edit_started = time.perf_counter()
    outcomes, stopped = _edit_all(items, root, folder, record_for, _edit_function(method, model, plan), overwrite)
    edit_seconds = time.perf_counter() - edit_started
    finished = {o.key for o in outcomes if o.status in ("done", "skipped")}
    rows = _score_all([item for item in items if item.key in finished], root, folder, scorers)
    metrics = present_metrics(scorers)
    summary = summarise(rows, metrics)
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "skipped", "failed")}
    report = {
        "root": str(root),
        "output": str(folder),
        "model": label,
        "backend": loaded.backend,
        "method": method,
        "sampler": sampler,
        "steps": steps,
        "guidance": plan.guidance,
        "tau": plan.tau,
        "seed": seed,
        "types": sorted(chosen_types) if chosen_types else None,
        "n_items": len(items),
        "edits": {
            **counts,
            "not_run": len(items) - len(outcomes),
            "seconds": round(edit_seconds, 3),
            "load_seconds": round(loaded.seconds, 3),
            "images_per_second": round(counts["done"] / edit_seconds, 4) if counts["done"] else None,
        },
        "metrics": metrics,
        "skipped_metrics": scorers.skipped,
        **summary,
        "failed": [{"key": o.key, "error": o.error} for o in outcomes if o.status == "failed"]
        + [{"key": row["key"], "error": row["error"]} for row in rows if "error" in row],
        "items": rows,
        "seconds": round(time.perf_counter() - started, 3),
    }
    markdown = markdown_tables(summary, metrics, scorers.skipped)
    json_path, markdown_path = write_report(folder, report, markdown)
    if as_json:
        from .values import strict_json

        click.echo(strict_json(report))
    else:
        click.echo(markdown)
    _say(
        f"{counts['done']} edited, {counts['skipped']} already there, {counts['failed']} failed; "
        f"report: {markdown_path} and {json_path.name}"
    )
    if stopped == "interrupted":
        sys.exit(130)
    if stopped == "stopped":
        raise click.ClickException("stopped: fix the error above and run again; finished outputs will be skipped")
    if report["failed"]:
        raise click.ClickException(f"{len(report['failed'])} of {len(items)} items failed (see the errors above)")


for _param in pie.params:  # the shared --json option says "one object per output"; here it is one report
    if _param.name == "as_json":
        _param.help = "Print the whole report (tables per editing type and overall) as one JSON object on stdout."
