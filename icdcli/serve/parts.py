"""Every name `icd serve` takes from icd's lower modules, in one place.

The server otherwise uses only the package face (`icdcli.ICDEditPipeline`, `icdcli.__version__`) and, for its
command, the shared options of `icdcli.cli.common`; when those modules move, this file is the one to follow them.
Importing it imports nothing heavier than NumPy and PIL.
"""

from __future__ import annotations

from icdcli.core.errors import ICDError
from icdcli.core.texts import TextError, check_text
from icdcli.core.values import NumberError, check_number
from icdcli.diffusion.recipe import (
    BLEND_KEEPS,
    BLEND_THRESHOLD,
    METHODS,
    P2P_MODES,
    P2POptions,
    check_replace_tail,
)
from icdcli.io.images import load_image, load_mask, original_size
from icdcli.models.checkpoints import model_files
from icdcli.models.identity import model_hash
from icdcli.run.batch import parameter_record
from icdcli.run.outputs import image_text
from icdcli.run.records import mask_record, unguided_record

__all__ = [
    "BLEND_KEEPS",
    "BLEND_THRESHOLD",
    "ICDError",
    "METHODS",
    "NumberError",
    "P2POptions",
    "P2P_MODES",
    "TextError",
    "check_number",
    "check_replace_tail",
    "check_text",
    "image_text",
    "load_image",
    "load_mask",
    "mask_record",
    "model_files",
    "model_hash",
    "original_size",
    "parameter_record",
    "unguided_record",
]
