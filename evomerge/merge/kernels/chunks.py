"""Run a kernel's chunks on the process's CPUs: one Python thread per torch thread, each op single-threaded.

    with kernel_threads():                                         # around one tensor's merge
        results = map_chunks(n, 1 << 16, body, make_state, device)  # body(state, start, end) -> result, in order

Chunks are small (their buffers stay in a core's L2 cache), so an op per chunk is a few microseconds:
torch's own intra-op threads would fork and join on every op, and on a busy machine one descheduled thread
stalls them all. Instead each worker thread takes the next chunk as soon as it is free (a slow core takes
fewer), runs its ops single-threaded (torch releases the GIL inside ops), and the results come back in
chunk order. Results never depend on the split: every chunk is computed the same way wherever it runs.
On a GPU the chunks run in order on the calling thread. `kernel_threads()` makes the calling thread's own
ops (samples, selections, checks between the chunked passes) single-threaded too: a two-thread OpenMP op
on a busy machine waits a scheduler time slice for its partner, which costs more than the op.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_key = (0, 0)  # (size, pid): a forked child has none of its parent's threads
_lock = threading.Lock()
_width: int | None = None  # inside kernel_threads(): the worker count (the torch threads the caller had)


@contextmanager
def kernel_threads() -> Iterator[int]:
    """Within: this thread's torch ops run single-threaded, and map_chunks uses as many workers as torch
    had threads before. Yields that count."""
    import torch

    global _width
    before, outer = torch.get_num_threads(), _width
    _width = outer or before
    torch.set_num_threads(1)
    try:
        yield _width
    finally:
        torch.set_num_threads(before)
        _width = outer


def _workers(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    with _lock:
        if _pool is None or _pool_key != (size, os.getpid()):
            if _pool is not None and _pool_key[1] == os.getpid():
                _pool.shutdown(wait=True)
            _pool, _pool_key = ThreadPoolExecutor(size, thread_name_prefix="evomerge-kernel"), (size, os.getpid())
        return _pool


def map_chunks(
    n: int,
    chunk: int,
    body: Callable[[Any, int, int], T],
    make_state: Callable[[], Any],
    device: Any = None,
    threads: int | None = None,
) -> list[T]:
    """[body(state, start, end) for each chunk of `n` elements], with one `make_state()` per worker."""
    import torch

    spans = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    if threads is None:
        threads = _width or torch.get_num_threads()
    threads = min(threads, len(spans))
    if threads <= 1 or (device is not None and torch.device(device).type != "cpu"):
        state = make_state()
        return [body(state, s, e) for s, e in spans]
    results: list[Any] = [None] * len(spans)
    counter = itertools.count()

    def work() -> None:
        torch.set_num_threads(1)  # this thread's ops: single-threaded (OpenMP's team size is per thread)
        state = make_state()
        while (i := next(counter)) < len(spans):
            results[i] = body(state, *spans[i])

    main = torch.get_num_threads()
    try:
        futures = [_workers(threads).submit(work) for _ in range(threads)]
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(main)  # set_num_threads also moves the process-wide default; put it back
    return results


__all__ = ["kernel_threads", "map_chunks"]
