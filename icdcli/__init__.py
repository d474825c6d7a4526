"""icd: text-guided editing of real photos with invertible Consistency Distillation.

The distribution installs as `icd` and imports as `icdcli`; its Python face is `ICDEditPipeline`
(`from icdcli import ICDEditPipeline`), imported when first named so that `import icdcli` and `icd --help`
stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from icdcli.core.lazy import lazy_exports
from icdcli.core.version import __version__

if TYPE_CHECKING:
    from icdcli.pipeline import ICDEditOutput, ICDEditPipeline

__all__ = ["ICDEditOutput", "ICDEditPipeline", "__version__"]

__getattr__, __dir__ = lazy_exports(__name__, globals(), {"ICDEditPipeline": "pipeline", "ICDEditOutput": "pipeline"})
