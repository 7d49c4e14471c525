"""Keep freed host memory in the process, so a CPU training step does not page-fault its temporaries anew.

XLA:CPU allocates one buffer for all temporaries of an executable at every call (0.79 GB for the base MAE-DFER
pre-training step at batch 2, 2 GB for the LGI-Former fine-tune) and frees it at the end. glibc serves a block that
large with ``mmap`` and gives it back with ``munmap``, so every step touches fresh 4 KiB pages (~290,000 and
~535,000), each a page fault plus zeroing: 0.45-0.56 s of system time per pre-training step and 1.1-1.2 s per
fine-tuning step on a 2-core machine (``getrusage``; the block comes from an XLA worker thread, whose non-main
malloc arena falls back to ``mmap`` for blocks over its 64 MB heap whatever ``M_MMAP_MAX`` says). With every thread
on the main arena (``M_ARENA_MAX=1``), no ``mmap`` (``M_MMAP_MAX=0``) and no trimming (``M_TRIM_THRESHOLD`` = max),
the freed block stays in the heap and the next step reuses it: zero minor faults per step after the first, and the
base steps 6-8% faster (``benchmarks/host_malloc_ab.py``; README, "Host memory on CPU").

The cost is that the process keeps its peak heap instead of returning it to the system, which is what a training
loop reaches anyway. It is applied by ``launch.py`` before anything starts a thread (glibc fixes each thread's arena
at its first allocation), only on CPU hosts: with a GPU or TPU the temporaries live in device memory, and a single
arena could only add lock contention there. ``FACEMAE_HOST_MALLOC=keep`` forces it, ``=default`` turns it off. Non-
glibc systems (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform

ENV = "FACEMAE_HOST_MALLOC"
# glibc <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def accelerator_present() -> bool:
    """An NVIDIA GPU or a TPU device node: the training step's temporaries will not be in host memory."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def keep_freed_memory(mode: str | None = None) -> bool:
    """Apply the glibc settings above if ``mode`` (default ``$FACEMAE_HOST_MALLOC``, else ``auto``) asks for them.

    ``auto`` = on CPU-only hosts; ``keep`` = always; ``default`` = never. Returns whether they were applied."""
    mode = (mode or os.environ.get(ENV) or "auto").lower()
    if mode not in ("auto", "keep", "default"):
        raise ValueError(f"{ENV}={mode!r}: expected auto, keep or default")
    if mode == "default" or (mode == "auto" and accelerator_present()):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; -1 as the trim threshold is SIZE_MAX once glibc widens it to size_t
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
