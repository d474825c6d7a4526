"""PIE-Bench's edits, through `icd edit`'s runner: one pipeline for batching, resume, claims and Ctrl-C.

`PieEditRun` is `EditRun` with the records PIE-Bench runs carry (its session, `PieSession`): the input's absolute
path (the benchmark's folder, not beside the outputs), the item's id and editing type (`pie`), and the seconds of
the edit (`seconds.edit`, inversion + decoding per item of its batch), which the report averages. Each item's
`blended_word` is its Prompt-to-Prompt local blend; a word missing from its prompt adds no region, as the
release does.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from icdcli.pie.dataset import PieItem, output_path, source_path
from icdcli.run.batch import Item
from icdcli.run.inputs import EditFlags
from icdcli.run.model import Loaded
from icdcli.run.report import ItemOutcome, RunEnd
from icdcli.run.runner import EditRun
from icdcli.run.session import EditSession


class PieSession(EditSession):
    """`EditSession` with PIE-Bench's records and blend words (see the module docstring)."""

    def __init__(self, flags: EditFlags, loaded: Loaded, entries: dict[str, PieItem]) -> None:
        super().__init__(flags, loaded)
        self.entries = entries

    def item_p2p(self, item: Item) -> Any:
        blend = self.entries[item.key].blend
        source, target = ((blend[0],), (blend[1],)) if blend else ((), ())
        return replace(self.p2p, blend_source=source, blend_target=target, strict_blend=False)

    def wanted(
        self, item: Item, input_sha: str, size: tuple[int, int] | None, mask_sha: str | None = None
    ) -> dict[str, Any]:
        entry = self.entries[item.key]
        record = super().wanted(item, input_sha, size, mask_sha)
        assert item.image is not None, "items with an image are the only ones edited"
        record["input"] = str(item.image.absolute())
        record["pie"] = {"key": entry.key, "editing_type_id": entry.editing_type_id}
        return record

    def stored_record(self, record: dict[str, Any], seconds: dict[str, Any]) -> dict[str, Any]:
        stages = {stage: round(value, 4) for stage, value in seconds.items() if stage != "batch_size"}
        edit = sum(seconds.get(stage, 0.0) for stage in ("encode", "decode"))
        return {**record, "seconds": {**stages, "edit": round(edit, 4)}}


class PieEditRun(EditRun):
    """`EditRun` over PIE-Bench items (see the module docstring); keeps every item's outcome for the report."""

    def __init__(
        self, flags: EditFlags, loaded: Loaded, items: list[PieItem], *, overwrite: bool, batch_size: int | None = None
    ):
        super().__init__(flags, None, batch=True, overwrite=overwrite, batch_size=batch_size)
        self.entries = {item.key: item for item in items}
        self.report.quiet = True  # a progress bar, no line per output
        self.report.outcomes = []
        self.adopt(loaded)

    def make_session(self, loaded: Loaded) -> EditSession:
        return PieSession(self.flags, loaded, self.entries)


def edit_job(root: Path, folder: Path, item: PieItem, mask: Path | None = None) -> Item:
    """One benchmark item as an edit of `icd edit`: its source image, prompts, blend words and output (and `mask`,
    the file of its annotated region, when the edit is held to it)."""
    return Item(
        label=item.key,
        key=item.key,
        image=source_path(root, item),
        src=item.source_prompt,
        tgt=item.target_prompt,
        output=output_path(folder, item),
        blended_word=item.blended_word,
        mask=mask,
    )


def write_mask(root: Path, folder: Path, item: PieItem) -> Path | None:
    """The item's annotated region as a mask file for `icd edit --mask` (`masks/<key>.png` in the run's folder,
    white where the edit may change the photo); None when its image cannot be read (the edit then fails on it)."""
    from PIL import Image

    from icdcli.core.errors import ICDError
    from icdcli.io.images import probe_image
    from icdcli.pie.dataset import decode_mask

    try:
        width, height = probe_image(source_path(root, item))
    except ICDError:
        return None
    path = folder / "masks" / f"{item.key}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    region = decode_mask(item.mask, height, width, border=False)
    Image.fromarray(region.astype("uint8") * 255).save(path)
    return path


def edit_items(
    items: list[PieItem],
    root: Path,
    folder: Path,
    *,
    flags: EditFlags,
    loaded: Loaded,
    overwrite: bool,
    batch_size: int | None = None,
    masked: bool = False,
) -> tuple[list[ItemOutcome], RunEnd]:
    """Edit every item into `folder` (outputs made with the same settings are skipped): the outcomes, in the
    items' order (those never run after a stop left out), and how the run ended.

    Args:
        items: the benchmark items to edit; root: the benchmark folder; folder: the run's folder.
        flags: the edit settings of the command line; loaded: the model; overwrite: replace other outputs.
        batch_size: items per network call (None: `icd edit`'s default).
        masked: hold each edit to its annotated region (`write_mask`), as `icd edit --mask` does.
    """
    from icdcli.editing.reuse import model_inversions

    model_inversions(loaded.model).clear()  # a run's seconds per edit include its own inversions, as run alone
    run = PieEditRun(flags, loaded, items, overwrite=overwrite, batch_size=batch_size)
    jobs = [edit_job(root, folder, item, write_mask(root, folder, item) if masked else None) for item in items]
    end = run.edit(jobs)
    return list(run.report.outcomes or []), end
