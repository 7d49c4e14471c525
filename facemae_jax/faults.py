"""One fault, one message: the command-line entry points show a known fault as its message alone.

The faults listed here carry messages that already say what failed, where, and what to do (a damaged shard and
its rebuild command, a checkpoint that fails verification, a full disk, a model that no longer fits its checkpoint,
a split that disagrees with its records, a diverged run). A traceback would only bury that message, so
:func:`one_message` prints ``<program>: error: <message>`` on stderr and exits with status 1. Anything else is a bug
and keeps its traceback. ``FACEMAE_TRACEBACK=1`` shows the traceback for known faults too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


def known_faults() -> tuple[type[BaseException], ...]:
    from data_pipelines import dataset_info, records
    from facemae_jax import checkpoint, train

    return (checkpoint.CheckpointError, records.RecordError, dataset_info.DatasetInfoError, train.TrainingDiverged)


@contextlib.contextmanager
def one_message(program: str) -> Iterator[None]:
    try:
        yield
    except known_faults() as e:
        if os.environ.get("FACEMAE_TRACEBACK"):
            raise
        print(f"{program}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
