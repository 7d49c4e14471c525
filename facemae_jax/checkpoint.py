"""Training checkpoints: orbax CheckpointManager over (train state, input-pipeline position, config).

Layout of ``workdir/checkpoints/<step>/``:
  state/   params, optimiser state, step (orbax StandardSave; restored onto any mesh through abstract targets
           that carry the new shardings)
  data/    the grain iterator state (JSON: a position in the global sample stream, see data_pipelines.pipeline)

Saving is asynchronous (training continues while the arrays are written); a checkpoint directory only becomes
visible once complete, so a job killed mid-save restarts from the previous one. RNG needs no saving: every step
derives its key from (config seed, step).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        args["data"] = ocp.args.JsonSave(data_state or {})
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """-> (state placed with the shardings of ``abstract_state``, data state, step)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return out["state"], dict(out["data"] or {}), step

    def restore_unsharded(self, step: int | None = None) -> tuple[Any, dict]:
        """Restore as saved, without a target (inspection and tests; arrays land on the default device)."""
        step = self.manager.latest_step() if step is None else step
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
        )
        return out["state"], dict(out["data"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what orbax needs to restore onto a new mesh)."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
