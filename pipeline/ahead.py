"""Run the steps of a batch pipeline on threads of their own, each a few batches ahead.

Tokenize and pack are chains of steps over batches (read, render, encode, check, write).
Most steps are Python and hold the GIL, but the heaviest ones do not: `tokenizers`'
`encode_batch` encodes on the library's own Rayon pool (one thread per core) with the GIL
released, and pyarrow's Parquet/IPC reads and writes and hashlib's sha256 release it too.
With each step on its own thread (`ahead`), the Python of one batch runs while another
is in the encoder or being written, so every core stays busy; each step still sees the
batches one at a time and in order, so what it computes, and so the bytes written, do not
depend on the threads. Only the threads' timing does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_END = object()


def ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """`items`, computed on a thread of their own up to `depth` items ahead of the caller.

    One thread advances `items`, so their work runs in order, as a plain loop would run
    it. An exception there is raised here at its place in the sequence, after the items
    before it; a generator computes nothing after raising. Closing this iterator (also by
    an exception in the caller's loop, with `contextlib.closing`) waits for the item being
    computed, drops the others and closes `items`. At most `depth` items are held.
    """
    iterator = iter(items)
    pool = ThreadPoolExecutor(1, thread_name_prefix="ahead")
    try:
        pending = deque(pool.submit(next, iterator, _END) for _ in range(depth))
        while (item := pending.popleft().result()) is not _END:
            pending.append(pool.submit(next, iterator, _END))
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # here, not when collected: a step ahead of it stops now
