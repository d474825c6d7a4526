"""A batch edit's settings on its loaded model: the flags laid over the model's recipe, and each item's record and
Prompt-to-Prompt settings.

`EditSession` is what other item sources adapt (`icd bench pie`: `icdcli.pie.editing`): the record an item wants
(`wanted`), the record its output stores (`stored_record`) and its P2P settings (`item_p2p`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from icdcli.run.inputs import EditFlags
from icdcli.run.model import Loaded, ModelIdentity
from icdcli.run.records import edit_record, file_record
from icdcli.run.steps import ItemFailed, RunError


class EditSession:
    """The run's flags over one loaded model (see the module docstring)."""

    def __init__(self, flags: EditFlags, loaded: Loaded) -> None:
        self.flags = flags
        self.loaded = loaded
        try:
            self.p2p = flags.request.p2p.resolve(loaded.model.info.edit)  # icdcli.diffusion.recipe.P2PSettings
        except ValueError as error:  # P2PError: values the model's recipe and the flags cannot combine
            raise RunError(str(error)) from None
        self.identity = ModelIdentity.of(loaded)

    def item_p2p(self, item: Any) -> Any:
        """The P2P settings of one item: a spec row's `blended_word` ("source target") adds per-prompt blend words,
        its `replace_tail` chooses the rule of a replace edit's tail."""
        settings = self.p2p
        if item.replace_tail is not None:
            settings = replace(settings, replace_tail=item.replace_tail)
        if not item.blended_word:
            return settings
        words = item.blended_word.split()
        if len(words) != 2:
            raise ItemFailed(f"{item.label}: blended_word must be two words, the source's and the target's")
        return replace(settings, blend_source=(words[0],), blend_target=(words[1],))

    def wanted(
        self, item: Any, input_sha: str, size: tuple[int, int] | None, mask_sha: str | None = None
    ) -> dict[str, Any]:
        """The record of an item's output: what decides whether an existing one is already made (`mask_sha`: the
        digest of the item's mask file, when it has one)."""
        request = self.flags.request.overridden(guidance=item.guidance, tau=item.tau, seed=item.seed)
        edit = request.resolve(self.loaded.model.info)
        p2p = self.item_p2p(item) if edit.method == "p2p" else None
        record = edit_record(edit, self.identity, src=item.src, tgt=item.tgt, output=item.output, image=item.image,
                             input_size=size, input_sha256=input_sha, p2p=p2p, unguided=self.flags.unguided,
                             recorded_input=item.recorded_input, mask=getattr(item, "mask", None),
                             mask_sha256=mask_sha, recorded_mask=getattr(item, "recorded_mask", None))  # fmt: skip
        return {**record, **file_record(item.output, quality=self.flags.quality, keep_exif=self.flags.keep_exif)}

    def stored_record(self, record: dict[str, Any], seconds: dict[str, Any]) -> dict[str, Any]:
        """The record an output carries, given the seconds of its batch per item (icd edit's: the record)."""
        return record
