r"""Run one program as N cooperating JAX processes on this machine (a local "pod").

    python -m bioscan_jax.launch --processes 2 --devices-per-process 4 -- \
        run.py --config=configs/barcodebert.py --workdir=/tmp/bb

starts ``python run.py ...`` twice. Process ``i`` gets

* ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES=N``, ``JAX_PROCESS_ID=i``
  (read by :func:`bioscan_jax.sharding.maybe_initialize_distributed`, which calls
  ``jax.distributed.initialize``);
* ``BIOSCAN_INIT_TIMEOUT_S`` / ``BIOSCAN_HEARTBEAT_TIMEOUT_S`` / ``BIOSCAN_SHUTDOWN_TIMEOUT_S``
  (the timeouts of ``jax.distributed.initialize``: a peer that never shows up, or stops sending
  heartbeats, fails the others after this long instead of hanging them);
* with ``--devices-per-process K > 0`` (the default, 4): ``JAX_PLATFORMS=cpu``,
  ``XLA_FLAGS=--xla_force_host_platform_device_count=K`` and
  ``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo`` (cross-process collectives on the CPU), so the N
  processes form one global mesh of ``N*K`` fake CPU devices. ``K = 0`` leaves the device
  environment alone (e.g. one process per GPU with ``CUDA_VISIBLE_DEVICES`` set by the caller).

The program runs exactly as it would on each host of a TPU pod or a multi-node GPU cluster; only
the way ``jax.distributed.initialize`` learns its coordinates differs (environment variables here,
auto-detection there).

Every output line of process ``i`` is printed with the prefix ``[i]``. The launcher **fails
fast**: as soon as one process exits with a non-zero code, it says which one and with which code,
stops the others (SIGTERM, then SIGKILL after ``--grace`` seconds: once ``jax.distributed`` is up,
JAX traps SIGTERM as a preemption notice and keeps running) and exits with that code.
``--timeout`` bounds the whole run (exit code 124). With ``--processes 1`` no distributed
environment is set: the program runs as a plain single-process job (a baseline for comparisons).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

#: Environment variables set for each process (besides the device settings).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
INIT_TIMEOUT_ENV = "BIOSCAN_INIT_TIMEOUT_S"
HEARTBEAT_TIMEOUT_ENV = "BIOSCAN_HEARTBEAT_TIMEOUT_S"
SHUTDOWN_TIMEOUT_ENV = "BIOSCAN_SHUTDOWN_TIMEOUT_S"

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the coordinator binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str, count: int) -> str:
    """``XLA_FLAGS`` with the fake host device count set to ``count`` (replacing any earlier one)."""
    kept = [f for f in xla_flags.split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    return " ".join(kept + [f"{_DEVICE_COUNT_FLAG}={count}"])


def process_env(
    process_id: int,
    num_processes: int,
    *,
    port: int,
    devices_per_process: int,
    init_timeout: int,
    heartbeat_timeout: int,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of process ``process_id`` (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    if devices_per_process > 0:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = with_device_count(env.get("XLA_FLAGS", ""), devices_per_process)
        env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    for name in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV):
        env.pop(name, None)
    if num_processes > 1:
        env[COORDINATOR_ENV] = f"127.0.0.1:{port}"
        env[NUM_PROCESSES_ENV] = str(num_processes)
        env[PROCESS_ID_ENV] = str(process_id)
        env[INIT_TIMEOUT_ENV] = str(init_timeout)
        env[HEARTBEAT_TIMEOUT_ENV] = str(heartbeat_timeout)
        env[SHUTDOWN_TIMEOUT_ENV] = str(init_timeout)
    return env


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _exit_status(code: int) -> int:
    """A shell-style exit status for a child's return code (signal N -> 128 + N)."""
    return 128 - code if code < 0 else code


@dataclasses.dataclass
class _Child:
    index: int
    proc: subprocess.Popen
    reader: threading.Thread


def _pump(stream, prefix: str, out: TextIO, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        with lock:
            out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            out.flush()
    stream.close()


def _stop(children: Sequence[_Child], grace: float) -> None:
    """SIGTERM every live child's process group, then SIGKILL what is left after ``grace`` s."""
    live = [c for c in children if c.proc.poll() is None]
    for c in live:
        try:
            os.killpg(c.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for c in live:
        try:
            c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(c.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            c.proc.wait()


def launch(
    command: Sequence[str],
    *,
    processes: int = 2,
    devices_per_process: int = 4,
    port: int = 0,
    init_timeout: int = 120,
    heartbeat_timeout: int = 30,
    timeout: float | None = None,
    grace: float = 2.0,
    prefix: bool = True,
    out: TextIO | None = None,
    log: TextIO | None = None,
) -> int:
    """Start ``python *command`` as ``processes`` JAX processes; return the launcher's exit status.

    0 when every process exited with 0; otherwise the (shell-style) status of the first process
    that failed, after the others were stopped; 124 when ``timeout`` seconds passed first.
    """
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    if devices_per_process < 0:
        raise ValueError(f"--devices-per-process must be >= 0, got {devices_per_process}")
    if not command:
        raise ValueError("nothing to launch: give the program after '--', e.g. -- run.py --config=...")
    out = out or sys.stdout
    log = log or sys.stderr
    port = port or free_port()
    lock = threading.Lock()
    children: list[_Child] = []
    argv = [sys.executable, *command]
    try:
        for i in range(processes):
            env = process_env(i, processes, port=port, devices_per_process=devices_per_process,
                              init_timeout=init_timeout, heartbeat_timeout=heartbeat_timeout)
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            tag = f"[{i}] " if prefix and processes > 1 else ""
            reader = threading.Thread(target=_pump, args=(proc.stdout, tag, out, lock), daemon=True)
            reader.start()
            children.append(_Child(i, proc, reader))
        start = time.monotonic()
        while True:
            codes = [c.proc.poll() for c in children]
            failed = [c for c, code in zip(children, codes) if code not in (None, 0)]
            if failed:
                first = failed[0]
                code = first.proc.returncode
                others = [c.index for c in children if c.proc.poll() is None]
                with lock:
                    log.write(f"launch: process {first.index} (pid {first.proc.pid}) exited with "
                              f"{_describe(code)}; stopping the other processes {others}\n")
                    log.flush()
                _stop(children, grace)
                status = _exit_status(code)
                return status if status else 1
            if all(code == 0 for code in codes):
                return 0
            if timeout is not None and time.monotonic() - start > timeout:
                with lock:
                    log.write(f"launch: timed out after {timeout:.0f} s; stopping all {processes} processes\n")
                    log.flush()
                _stop(children, grace)
                return 124
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(children, grace)
        return 130
    finally:
        for c in children:
            c.reader.join(timeout=2.0)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1:]
    else:
        own, command = argv, []
    p = argparse.ArgumentParser(
        prog="python -m bioscan_jax.launch",
        description="Run a program as N JAX processes on this machine (one global mesh).",
        epilog="Example: python -m bioscan_jax.launch --processes 2 --devices-per-process 4 -- "
               "run.py --config=configs/barcodebert.py")
    p.add_argument("--processes", "-n", type=int, default=2, help="number of processes (default 2)")
    p.add_argument("--devices-per-process", "-d", type=int, default=4,
                   help="fake CPU devices per process (default 4); 0 = leave the device setup alone")
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--init-timeout", type=int, default=120,
                   help="seconds jax.distributed.initialize waits for every process (default 120)")
    p.add_argument("--heartbeat-timeout", type=int, default=30,
                   help="seconds without a heartbeat before a process counts as dead (default 30)")
    p.add_argument("--timeout", type=float, default=None, help="seconds for the whole run (default: none)")
    p.add_argument("--grace", type=float, default=2.0,
                   help="seconds between SIGTERM and SIGKILL when stopping processes (default 2)")
    p.add_argument("--no-prefix", action="store_true", help="do not prefix output lines with [i]")
    args = p.parse_args(own)
    if not command:
        p.error("give the program after '--', e.g. -- run.py --config=configs/barcodebert.py")
    return args, command


def main(argv: Sequence[str] | None = None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    return launch(command, processes=args.processes, devices_per_process=args.devices_per_process,
                  port=args.port, init_timeout=args.init_timeout, heartbeat_timeout=args.heartbeat_timeout,
                  timeout=args.timeout, grace=args.grace, prefix=not args.no_prefix)


if __name__ == "__main__":
    sys.exit(main())
