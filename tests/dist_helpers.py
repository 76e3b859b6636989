"""The one way the tests run a function in P real processes (gloo over a file store).

``run_ranks(fn, world_size, *args, timeout=...)`` spawns ``world_size`` processes that each call
``fn(rank, world_size, *args)`` inside an initialized default process group and returns their
results in rank order (results travel through ``torch.save``, tensors included). The call fails
with an ``AssertionError`` that holds every failed rank's report:

- a rank that raises: its traceback;
- a rank that dies without a result (a crash, an abort): its exit code and, where Python could
  write it, the stack of every thread at the fatal signal;
- a rank still running after ``timeout`` seconds in all (e.g. a hang in a collective): the
  stack of every thread at that moment, then the rank is killed;
- a rank that exits with a non-zero code after returning its result (an abort at exit).

The parent never waits longer than ``timeout`` plus a few seconds.
"""

from __future__ import annotations

import datetime
import faulthandler
import io
import os
import queue
import signal
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Every collective of a test finishes in milliseconds: a stuck one fails fast.
COLLECTIVE_TIMEOUT_S = 30
# How long a rank that has reported may take to exit, and a dumping rank to write its stacks.
EXIT_GRACE_S = 10
DUMP_GRACE_S = 2


def _stack_file(tmp: str, rank: int) -> str:
    return os.path.join(tmp, f"stacks-rank{rank}.txt")


def _entry(fn: Callable[..., Any], rank: int, world_size: int, tmp: str, out: Any,
           args: tuple) -> None:
    # Fatal signals and the parent's SIGUSR1 (sent on timeout) write every thread's stack here.
    stacks = open(_stack_file(tmp, rank), "w")  # noqa: SIM115 (open for the process's life)
    faulthandler.enable(file=stacks, all_threads=True)
    if hasattr(faulthandler, "register"):
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}",
                                rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        try:
            result = fn(rank, world_size, *args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(result, buffer)
        out.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 (reported to the parent)
        out.put((rank, False, traceback.format_exc()))


def _read_stacks(tmp: str, rank: int) -> str:
    try:
        with open(_stack_file(tmp, rank)) as f:
            text = f.read().strip()
    except OSError:
        return ""
    return f"\nstacks of rank {rank}:\n{text}" if text else ""


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any,
              timeout: float = 120.0) -> List[Any]:
    """``fn(rank, world_size, *args)`` in ``world_size`` processes with a gloo group; their
    results in rank order. ``fn`` must be importable (a module-level function)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    results: Dict[int, Any] = {}
    errors: Dict[int, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, tmp, out, args),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while len(results) + len(errors) < world_size:
                try:
                    rank, ok, value = out.get(timeout=0.2)
                except queue.Empty:
                    pass
                else:
                    if ok:
                        results[rank] = torch.load(io.BytesIO(value), weights_only=False)
                    else:
                        errors[rank] = value
                    continue
                # Ranks that died without a report (their report may still be in the queue's
                # pipe: give it one more poll after the exit).
                for rank, p in enumerate(procs):
                    if rank in results or rank in errors or p.exitcode is None:
                        continue
                    time.sleep(0.2)
                    if out.empty():
                        errors[rank] = (f"exited with code {p.exitcode} without a result"
                                        + _read_stacks(tmp, rank))
                    break
                if time.monotonic() > deadline:
                    for rank, p in enumerate(procs):
                        if rank not in results and rank not in errors and p.is_alive():
                            os.kill(p.pid, signal.SIGUSR1)
                    time.sleep(DUMP_GRACE_S)
                    for rank, p in enumerate(procs):
                        if rank not in results and rank not in errors:
                            errors[rank] = (f"still running after {timeout} s"
                                            + _read_stacks(tmp, rank))
                    break
            for rank, p in enumerate(procs):
                p.join(timeout=EXIT_GRACE_S if rank in results else 0.1)
                if rank in results and p.exitcode is None:
                    errors[rank] = f"returned its result, then did not exit in {EXIT_GRACE_S} s"
                elif rank in results and p.exitcode != 0:
                    errors[rank] = (f"returned its result, then exited with code {p.exitcode}"
                                    + _read_stacks(tmp, rank))
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        raise AssertionError(f"{len(errors)} of {world_size} ranks failed:\n" + "\n".join(
            f"--- rank {rank}: {errors[rank]}" for rank in sorted(errors)))
    return [results[r] for r in range(world_size)]
