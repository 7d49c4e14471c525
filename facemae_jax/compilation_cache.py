"""jax's persistent compilation cache, on by default, so that a resumed run does not compile its steps again.

Every restart after a preemption would otherwise pay the full XLA compilation of the train step (29 s fine-tuning,
41 s pre-training for the base models on a 2-core CPU; minutes on a pod). The cache key is jax's own (the
computation, the compiler flags, the devices), so a changed model or mesh simply misses; it is safe to share the
directory between runs. ``config.compilation_cache_dir`` sets the folder ('' turns it off); jax's own
``JAX_COMPILATION_CACHE_DIR`` environment variable, when set, takes precedence.
"""

from __future__ import annotations

import os

import jax


def enable(directory: str) -> str | None:
    """Point jax's persistent cache at ``directory`` (created) -> the folder used, or None when off.

    Off for multi-process runs on the CPU backend: with jax 0.10.2 an executable loaded from the cache there talks
    to 1 gloo peer instead of all of them and the step never finishes (found by tests/test_multiprocess.py)."""
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if env:
        directory = env
    if not directory:
        return None
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        if env:
            raise RuntimeError("JAX_COMPILATION_CACHE_DIR is set, but jax 0.10.2's persistent cache hangs "
                               "multi-process CPU (gloo) runs: unset it for this run")
        print("[compile cache] off: multi-process CPU runs hang on cached executables (jax 0.10.2, gloo)",
              flush=True)
        return None
    path = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # cache everything that took a noticeable time to compile (jax's default threshold is 1 s)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path
