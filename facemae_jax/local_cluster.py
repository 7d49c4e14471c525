"""Start N cooperating JAX processes on this machine, as the hosts of a pod would run (a rehearsal).

    python -m facemae_jax.local_cluster --processes 2 --devices_per_process 4 -- \
        launch.py --config=configs/smoke.py --workdir=DIR

Everything after ``--`` is the Python command line each process runs (``python <that>``). Each process gets the
environment a pod host would have: ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` (read by ``launch.py``, see facemae_jax.distributed), ``JAX_PLATFORMS=cpu`` and
``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` (its CPU devices). Cross-process collectives run over
gloo on localhost, checkpoints go to the one shared workdir: the same code path as a multi-host job.

Output: every line of every process, prefixed with ``[p<id>]``, in the order they arrive. Faults: when a process
exits with a non-zero status, the others get ``--grace_s`` seconds to stop by themselves (JAX aborts them once the
coordination service misses the dead one's heartbeats; the time each took is printed), then SIGTERM, then SIGKILL.
SIGTERM / SIGINT sent to this helper are forwarded to every process (a preemption rehearsal: all save a
checkpoint at the next step and exit 0). The exit status is 0 only if every process exited 0; otherwise that of
the first process that failed (128 + signal number for a signal).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from facemae_jax import distributed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices_per_process: int,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process ``process_id`` of a local cluster."""
    env = dict(os.environ if base is None else base)
    env.update({
        distributed.ENV_COORDINATOR: f"127.0.0.1:{port}",
        distributed.ENV_NUM_PROCESSES: str(num_processes),
        distributed.ENV_PROCESS_ID: str(process_id),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": distributed.local_device_flags(devices_per_process, env.get("XLA_FLAGS", "").split()),
        "PYTHONUNBUFFERED": "1",  # lines arrive when written, so the prefixed log is in order
    })
    env.pop("JAX_NUM_CPU_DEVICES", None)  # XLA_FLAGS decides
    return env


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


def _pump(process_id: int, stream, out, lock: threading.Lock) -> None:
    """Copy a child's output line by line with its prefix (of a progress bar's \\r-updates, the last one)."""
    prefix = f"[p{process_id}] ".encode()
    for raw in iter(stream.readline, b""):
        line = raw.rstrip(b"\n").split(b"\r")
        text = next((seg for seg in reversed(line) if seg.strip()), b"")
        with lock:
            out.write(prefix + text + b"\n")
            out.flush()
    stream.close()


class LocalCluster:
    """N child processes running ``python <argv>``; see the module docstring."""

    def __init__(self, argv: Sequence[str], processes: int, devices_per_process: int, *, port: int | None = None,
                 grace_s: float = 10.0, out=None):
        if processes < 1 or devices_per_process < 1:
            raise ValueError(f"--processes ({processes}) and --devices_per_process ({devices_per_process}) "
                             "must be >= 1")
        if not argv:
            raise ValueError("nothing to run: give the command after '--', e.g. -- launch.py --config=configs/smoke.py")
        self.argv = list(argv)
        self.processes = processes
        self.devices_per_process = devices_per_process
        self.port = port or free_port()
        self.grace_s = grace_s
        self.out = out or sys.stdout.buffer
        self.lock = threading.Lock()
        self.children: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []

    def say(self, message: str) -> None:
        with self.lock:
            self.out.write(f"[local_cluster] {message}\n".encode())
            self.out.flush()

    def start(self) -> None:
        self.say(f"{self.processes} processes x {self.devices_per_process} CPU devices, coordinator "
                 f"127.0.0.1:{self.port}: python {' '.join(self.argv)}")
        for i in range(self.processes):
            child = subprocess.Popen(
                [sys.executable, *self.argv], env=process_env(i, self.processes, self.port, self.devices_per_process),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            )
            self.children.append(child)
            self.say(f"process {i}: pid {child.pid}")
            pump = threading.Thread(target=_pump, args=(i, child.stdout, self.out, self.lock), daemon=True)
            pump.start()
            self.pumps.append(pump)

    def signal_all(self, signum: int) -> None:
        for child in self.children:
            if child.poll() is None:
                try:
                    os.killpg(child.pid, signum)
                except ProcessLookupError:
                    pass

    def wait(self) -> int:
        """Wait for all; stop the others after a failure. -> exit status (see module docstring)."""
        first_failure: tuple[int, int, float] | None = None  # (process id, code, time)
        reported: set[int] = set()
        stage = 0  # 0: running, 1: grace period, 2: SIGTERM sent, 3: SIGKILL sent
        stage_at = 0.0
        while True:
            now = time.monotonic()
            for i, child in enumerate(self.children):
                code = child.poll()
                if code is None or i in reported:
                    continue
                reported.add(i)
                if first_failure is None and code != 0:
                    first_failure = (i, code, now)
                    stage, stage_at = 1, now
                    self.say(f"process {i} failed ({_status(code)}); the others have {self.grace_s:g} s to stop "
                             "by themselves")
                elif first_failure is not None and i != first_failure[0]:
                    how = "by itself" if stage == 1 else "after " + ("SIGTERM" if stage == 2 else "SIGKILL")
                    self.say(f"process {i} exited {how} ({_status(code)}) {now - first_failure[2]:.1f} s after "
                             f"process {first_failure[0]} failed")
                else:
                    self.say(f"process {i} exited ({_status(code)})")
            if len(reported) == len(self.children):
                break
            if stage == 1 and now - stage_at > self.grace_s:
                self.say("stopping the remaining processes (SIGTERM)")
                self.signal_all(signal.SIGTERM)
                stage, stage_at = 2, now
            elif stage == 2 and now - stage_at > 10:
                self.say("killing the remaining processes (SIGKILL)")
                self.signal_all(signal.SIGKILL)
                stage, stage_at = 3, now
            time.sleep(0.05)
        for pump in self.pumps:
            pump.join(timeout=5)
        if first_failure is not None:
            return _exit_code(first_failure[1])
        return 0

    def run(self) -> int:
        forwarded = {}

        def forward(signum, frame):
            del frame
            self.say(f"{signal.Signals(signum).name} received: forwarding it to every process")
            self.signal_all(signum)

        for s in (signal.SIGTERM, signal.SIGINT):
            forwarded[s] = signal.signal(s, forward)
        try:
            self.start()
            return self.wait()
        finally:
            for s, handler in forwarded.items():
                signal.signal(s, handler)
            self.signal_all(signal.SIGKILL)  # nothing outlives the helper


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1:]
    else:
        own, command = argv, []
    parser = argparse.ArgumentParser(prog="python -m facemae_jax.local_cluster",
                                     description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [--processes N] [--devices_per_process D] -- SCRIPT.py ARGS...")
    parser.add_argument("--processes", type=int, default=2, help="number of processes (default 2)")
    parser.add_argument("--devices_per_process", type=int, default=4, help="CPU devices per process (default 4)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--grace_s", type=float, default=10.0,
                        help="after a process fails, seconds the others get to stop by themselves (default 10)")
    args = parser.parse_args(own)
    try:
        cluster = LocalCluster(command, args.processes, args.devices_per_process, port=args.port or None,
                               grace_s=args.grace_s)
    except ValueError as e:
        parser.error(str(e))
    return cluster.run()


if __name__ == "__main__":
    sys.exit(main())
