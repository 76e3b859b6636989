"""One way to run a function in P real processes (gloo over a file store), bounded in time.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes that each call
``fn(rank, world_size, *args)`` inside an initialized default group and returns their results in
rank order. A rank that raises fails the call with its traceback; a rank that does not finish
within ``timeout`` seconds (a hang in a collective) is killed and fails the call too.
"""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Every collective of a test finishes in milliseconds: a stuck one fails fast.
COLLECTIVE_TIMEOUT_S = 30


def _entry(fn: Callable[..., Any], rank: int, world_size: int, store: str, out: Any,
           args: tuple) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        try:
            result = fn(rank, world_size, *args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        out.put((rank, True, result))
    except BaseException:  # noqa: BLE001 (reported to the parent)
        out.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any,
              timeout: float = 120.0) -> List[Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, store, out, args),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict = {}
        errors: List[str] = []
        try:
            while len(results) + len(errors) < world_size:
                try:
                    rank, ok, value = out.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(results))} "
                                       f"did not finish within {timeout} s") from None
                if ok:
                    results[rank] = value
                else:
                    errors.append(f"rank {rank}:\n{value}")
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
