"""Training checkpoints: orbax CheckpointManager over (train state, input-pipeline position, checksums).

Layout of ``workdir/checkpoints/<step>/``:
  state/      params, optimiser state, step (orbax StandardSave; restored onto any mesh through abstract targets
              that carry the new shardings)
  data/       the grain iterator state (JSON: a position in the global sample stream, data_pipelines.resumable_iterator)
  integrity/  JSON: shape, dtype and content fingerprint of every state array (``facemae_jax.fingerprint``) and a
              SHA-256 of the data state. orbax/tensorstore store no checksum of the values (see fingerprint.py), so
              without this a flipped byte restores silently as different parameters.

Saving is asynchronous (training continues while the arrays are written); a checkpoint directory only becomes
visible once complete, so a job killed mid-save restarts from the previous one. The fingerprints are computed from
the in-memory state when the save is issued (on the devices, one pass over the state), so they describe what was
meant to be written. RNG needs no saving: every step derives its key from (config seed, step).

Every restore is verified: shapes first (against the integrity item, before any array is read: a model whose
shape changed gets one message listing the keys, never orbax's per-array tracebacks), then the fingerprints of
what was read. A checkpoint that fails is reported by step and path, moved aside to ``<dir>.corrupt/`` (kept for
inspection, out of orbax's way so the step can be written again), and the newest older checkpoint that verifies is
used instead; if none does, the restore stops. A failed save (disk full, ...) surfaces once, as
:class:`CheckpointSaveError` naming the step, the path and the last complete checkpoint, which stays untouched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import traceback
from typing import Any

import jax
import orbax.checkpoint as ocp

from facemae_jax import fingerprint


class CheckpointError(RuntimeError):
    """A checkpoint fault with a message that says what, where and what to do (shown without a traceback)."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (disk full, permissions, ...); the previous complete checkpoint is kept."""


class CheckpointCorrupt(CheckpointError):
    """No checkpoint of the directory verifies (the run cannot resume from it)."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint holds another model (keys or shapes changed since it was written)."""


# ------------------------------------------------------------------------------------------------------------
# One error, not a flood: orbax's background threads log every failure with a traceback (one per array and per
# layer of its futures: 195 tracebacks for one full disk), and their closed event loops raise 'Event loop is
# closed' into sys.unraisablehook. The same error is re-raised by orbax in the main thread, where Checkpointer turns
# it into one message; these hooks keep the background copies quiet (the first one is kept for that message).
# ------------------------------------------------------------------------------------------------------------

_quiet_lock = threading.Lock()
_background_errors: list[str] = []


def _from_orbax(tb) -> bool:
    return any("orbax" in frame.filename or "tensorstore" in frame.filename for frame in traceback.extract_tb(tb))


class _OrbaxThreadErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[2] is not None and _from_orbax(record.exc_info[2]):
            with _quiet_lock:
                if len(_background_errors) < 20:
                    _background_errors.append(str(record.exc_info[1]))
            return False
        return True


_filter = _OrbaxThreadErrors()
_previous_unraisablehook = None


def _unraisable(unraisable) -> None:
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
        return  # a tensorstore callback into an orbax thread's finished event loop: a symptom, never the cause
    (_previous_unraisablehook or sys.__unraisablehook__)(unraisable)


def _install_quiet_hooks() -> None:
    global _previous_unraisablehook
    from absl import logging as absl_logging

    absl_logger = absl_logging.get_absl_logger()
    if _filter not in absl_logger.filters:
        absl_logger.addFilter(_filter)
    if sys.unraisablehook is not _unraisable:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _unraisable


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:600]


def _is_disk_full(e: BaseException) -> bool:
    text = str(e)
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in text or \
        "os_error_code='28'" in text


def _data_digest(data_state: dict) -> str:
    return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


def _is_main() -> bool:
    return jax.process_index() == 0


def _say(message: str) -> None:
    if _is_main():
        print(message, file=sys.stderr, flush=True)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def compare_shapes(saved: dict[str, dict], wanted: dict[str, dict], *, limit: int = 20) -> list[str]:
    """Lines describing how the saved arrays differ from the wanted ones (empty: same keys, shapes and dtypes)."""
    lines = []
    for key in sorted(set(saved) | set(wanted)):
        s, w = saved.get(key), wanted.get(key)
        if s is None:
            lines.append(f"{key}: not in the checkpoint (new in the model: {tuple(w['shape'])} {w['dtype']})")
        elif w is None:
            lines.append(f"{key}: in the checkpoint {tuple(s['shape'])} {s['dtype']}, not in the model")
        elif list(s["shape"]) != list(w["shape"]) or s["dtype"] != w["dtype"]:
            lines.append(f"{key}: checkpoint {tuple(s['shape'])} {s['dtype']}, model {tuple(w['shape'])} {w['dtype']}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        _install_quiet_hooks()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "integrity"))
        self._pending_step: int | None = None  # the step whose asynchronous save may still be running

    # -- saving ---------------------------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def complete_steps(self) -> list[int]:
        """Steps whose directory is complete on disk (orbax renames a checkpoint into place when it is done)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

    def _save_failed(self, step: int | None, e: BaseException) -> CheckpointSaveError:
        with _quiet_lock:
            background = list(_background_errors)
            _background_errors.clear()
        cause = _first_line(e)
        if background and background[0].splitlines()[0] not in cause:
            cause += f" (first error in orbax's writer threads: {background[0].splitlines()[0][:400]})"
        done = [s for s in self.complete_steps() if step is None or s != step]
        kept = (f"The last complete checkpoint, step {done[-1]} ({os.path.join(self.directory, str(done[-1]))}), "
                "is kept and untouched; rerun the same command to resume from it" if done
                else "No complete checkpoint exists yet; a rerun starts from the beginning")
        if _is_disk_full(e) or any(_is_disk_full(Exception(b)) for b in background):
            free = shutil.disk_usage(self.directory).free if os.path.isdir(self.directory) else 0
            what = (f"the disk holding {self.directory} is full ({free / 2**20:.1f} MiB free now). Free space, move "
                    "the workdir to a larger disk, or keep fewer checkpoints (--config.checkpoint.keep)")
        else:
            what = f"saving failed: {cause}"
        where = os.path.join(self.directory, str(step)) if step is not None else self.directory
        if step is not None and _is_main():  # the partial write only takes space: remove it
            for name in os.listdir(self.directory) if os.path.isdir(self.directory) else []:
                if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        return CheckpointSaveError(
            f"checkpoint of step {step} could not be written to {where}: {what}. {kept}. (cause: {cause})")

    def _wait_pending(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # the previous asynchronous save failed
            step, self._pending_step = self._pending_step, None
            raise self._save_failed(step, e) from None
        self._pending_step = None

    def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> bool:
        self._wait_pending()  # orbax waits for the previous save here anyway; this names its step if it failed
        data_state = data_state or {}
        integrity = {"algorithm": fingerprint.ALGORITHM, "arrays": fingerprint.describe_tree(state),
                     "data_sha256": _data_digest(data_state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  integrity=ocp.args.JsonSave(integrity))
        try:
            saved = self.manager.save(step, args=args, force=force)
        except Exception as e:
            raise self._save_failed(step, e) from None
        if saved:
            self._pending_step = step
        return saved

    def wait(self) -> None:
        self._wait_pending()

    def close(self) -> None:
        try:
            self._wait_pending()
        finally:
            self.manager.close()

    # -- restoring ------------------------------------------------------------------------------------------------

    def _read_integrity(self, step: int) -> dict | None:
        """The integrity item of ``step``; None when the checkpoint predates it. Raises if it is unreadable."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "integrity")):
            return None
        out = self.manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))
        integrity = dict(out["integrity"] or {})
        if integrity.get("algorithm") != fingerprint.ALGORITHM or not isinstance(integrity.get("arrays"), dict):
            raise ValueError(f"integrity item has algorithm {integrity.get('algorithm')!r} "
                             f"(this code writes {fingerprint.ALGORITHM!r})")
        return integrity

    def _verify(self, step: int, integrity: dict | None, state: Any, data_state: dict) -> list[str]:
        """-> problems found (empty: verified). Also a collective: every process computes the same fingerprints."""
        if integrity is None:
            return []
        found = fingerprint.describe_tree(state)
        saved = integrity["arrays"]
        bad = [k for k in sorted(saved) if k not in found or found[k]["fingerprint"] != saved[k]["fingerprint"]]
        problems = []
        if bad:
            problems.append(f"{len(bad)} of {len(saved)} arrays differ from the checksums saved with them "
                            f"({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})")
        if _data_digest(data_state) != integrity.get("data_sha256"):
            problems.append("the input-pipeline position (data/) differs from its saved checksum")
        return problems

    def _quarantine(self, step: int) -> str:
        """Move a failing checkpoint out of orbax's directory (kept for inspection) so its step can be rewritten."""
        dest_dir = self.directory + ".corrupt"
        dest = os.path.join(dest_dir, str(step))
        _barrier(f"checkpoint {step} judged")
        if _is_main():
            os.makedirs(dest_dir, exist_ok=True)
            n = 1
            while os.path.exists(dest):
                dest, n = os.path.join(dest_dir, f"{step}.{n}"), n + 1
            os.replace(os.path.join(self.directory, str(step)), dest)
        _barrier(f"checkpoint {step} moved")
        self.manager.reload()
        return dest

    def restore(self, abstract_state: Any, step: int | None = None, *, fall_back: bool = True) -> tuple[Any, dict, int]:
        """-> (verified state placed with the shardings of ``abstract_state``, data state, step restored).

        Tries ``step`` (default: the newest) and, when it fails verification or cannot be read and ``fall_back``,
        each older checkpoint in turn; every failure is reported on stderr. Raises CheckpointMismatch when the
        model's keys or shapes differ from the checkpoint's, CheckpointCorrupt when no checkpoint verifies.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if step is not None:
            steps = [s for s in steps if s <= step] if fall_back else [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        wanted = fingerprint.abstract_description(abstract_state)
        failures = []
        for s in steps:
            path = os.path.join(self.directory, str(s))
            try:
                integrity = self._read_integrity(s)
            except Exception as e:
                problems = [f"its checksum file cannot be read ({_first_line(e)})"]
            else:
                if integrity is not None:
                    diff = compare_shapes(integrity["arrays"], wanted)
                    if diff:
                        raise CheckpointMismatch(self._mismatch_message(s, path, diff))
                try:
                    out = self.manager.restore(s, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
                    state, data_state = out["state"], dict(out["data"] or {})
                except Exception as e:
                    if integrity is None and _looks_like_shape_error(e):
                        raise CheckpointMismatch(self._mismatch_message(s, path, [_first_line(e)])) from None
                    problems = [f"it cannot be read ({type(e).__name__}: {_first_line(e)})"]
                else:
                    problems = self._verify(s, integrity, state, data_state)
                    if not problems:
                        if integrity is None:
                            _say(f"[checkpoint] step {s} ({path}) has no checksums (written by an older version): "
                                 "restored without verification")
                        if failures:
                            _say(f"[checkpoint] falling back to step {s} ({path}), the newest checkpoint that "
                                 "verifies")
                        return state, data_state, s
                    del state
            failures.append(f"step {s} ({path}): {'; '.join(problems)}")
            if not fall_back:
                break
            moved = self._quarantine(s)
            _say(f"[checkpoint] step {s} ({path}) fails verification: {'; '.join(problems)}. Moved to {moved}.")
        raise CheckpointCorrupt(
            f"no checkpoint in {self.directory} verifies:\n  " + "\n  ".join(failures) +
            f"\nThe failing ones were moved to {self.directory}.corrupt/. To start from the beginning, rerun the "
            "same command (nothing is left to resume from) or use a new --workdir."
            if fall_back else f"checkpoint {failures[0]}")

    def _mismatch_message(self, step: int, path: str, diff: list[str]) -> str:
        workdir = os.path.dirname(self.directory)
        return (
            f"checkpoint step {step} ({path}) was written for another model shape than the current config's:\n  "
            + "\n  ".join(diff)
            + f"\nThe config changed since this run started. To start fresh with the new model, use a new --workdir "
            f"(or move {self.directory} away). To start from this run's weights instead, use a new --workdir with "
            f"--config.init_from={workdir} (it reads {workdir}/export, written when that run finished) or go back "
            "to the old model settings to resume."
        )

    def restore_unsharded(self, step: int | None = None) -> tuple[Any, dict]:
        """Restore as saved, without a target (inspection and tests; arrays land on the default device); verified."""
        step = self.manager.latest_step() if step is None else step
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
        )
        state, data_state = out["state"], dict(out["data"] or {})
        problems = self._verify(step, self._read_integrity(step), state, data_state)
        if problems:
            raise CheckpointCorrupt(f"checkpoint step {step} ({os.path.join(self.directory, str(step))}) fails "
                                    f"verification: {'; '.join(problems)}")
        return state, data_state


def _looks_like_shape_error(e: BaseException) -> bool:
    text = str(e).lower()
    return "shape" in text and ("mismatch" in text or "incompatible" in text or "does not match" in text)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what orbax needs to restore onto a new mesh)."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
