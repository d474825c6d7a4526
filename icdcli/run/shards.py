"""A run split over processes (`--shard auto` under a launcher): every process's summary gathered, for the total.

Which items a shard edits is decided in `icdcli.run.batch` (`select_shard`); this module only brings the
processes' summaries together once each has finished.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any


def gathered_total(mine: dict[str, Any], rank: int, world: int) -> dict[str, Any] | None:
    """The total over every process's summary (`icdcli.run.batch.total_summary`), for rank 0; None elsewhere.

    The processes meet through torch.distributed (gloo, the launcher's MASTER_ADDR/MASTER_PORT) once each
    has finished; without a launcher's rendezvous there is no total (None), only each process's own summary.
    """
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    import torch.distributed as dist

    from icdcli.run.batch import total_summary

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(days=7))
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        dist.destroy_process_group()
    except (RuntimeError, ValueError, OSError) as error:
        logging.getLogger("icd").warning("no total over the shards: the processes could not meet (%s)", error)
        return None
    return total_summary(gathered) if rank == 0 else None


def total_line(total: dict[str, Any]) -> str:
    """The line that says the total of a sharded run."""
    return (
        f"total over {total['processes']} processes: {total['done']} done, {total['skipped']} skipped, "
        f"{total['failed']} failed in {total['seconds']:.1f} s ({total['images_per_second']:.2f} images/s)"
    )
