"""host_memory.keep_freed_memory: a large block freed by a worker thread is reused without new page faults."""

import platform
import subprocess
import sys
import textwrap

import pytest

from facemae_jax import host_memory

# A worker thread (as XLA's) mallocs, touches and frees a 256 MB block, twice; prints the second round's minor faults.
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from facemae_jax import host_memory
    print("applied", host_memory.keep_freed_memory(sys.argv[1]))
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 256 << 20
    faults = []
    def work():
        for _ in range(2):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            p = libc.malloc(size)
            ctypes.memset(p, 1, size)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    t = threading.Thread(target=work)
    t.start(); t.join()
    print("faults", faults[1])
""")


def _second_round_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied = out.split("applied ")[1].split()[0]
    return applied, int(out.split("faults ")[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_block_is_reused_without_page_faults():
    applied, faults = _second_round_faults("keep")
    assert applied == "True"
    assert faults < 1000  # the block stayed in the heap
    applied, faults = _second_round_faults("default")
    assert applied == "False"
    assert faults > 30000  # 256 MB of fresh 4 KiB pages (65,536), unless the system hands out huge pages


def test_modes(monkeypatch):
    monkeypatch.setattr(host_memory, "accelerator_present", lambda: True)
    assert host_memory.keep_freed_memory("auto") is False  # device memory holds the temporaries there
    assert host_memory.keep_freed_memory("default") is False
    monkeypatch.setenv(host_memory.ENV, "sometimes")
    with pytest.raises(ValueError, match="FACEMAE_HOST_MALLOC='sometimes'"):
        host_memory.keep_freed_memory()


def test_launch_applies_it_at_start(tmp_path):
    """launch.py reads the setting before anything else (a bad value fails at once, before flags or jax)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FACEMAE_HOST_MALLOC="sometimes")
    r = subprocess.run([sys.executable, os.path.join(root, "launch.py"), "--config=configs/smoke.py",
                        f"--workdir={tmp_path}"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "FACEMAE_HOST_MALLOC='sometimes': expected auto, keep or default" in r.stderr
    assert not os.listdir(tmp_path)
