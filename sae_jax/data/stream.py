"""What every data source yields, and a background thread that reads ahead."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    """This process's rows of one global batch.

    x: [rows, d] scaled so that E||x||^2 = d; float32, or the activation shards' dtype
        (float16 / bfloat16: the model casts on the device).
    position: where the source's stream stands after this batch (resume from it).
    keep: [rows] bool, False for outlier tokens (evaluation batches of real activations);
        None when every token counts.
    """

    x: np.ndarray
    position: int
    keep: np.ndarray | None = None


_END = object()


def prefetch(items: Iterator, depth: int) -> Iterator:
    """Run `items` in a daemon thread, `depth` items ahead; errors re-raise in the consumer.
    Closing the returned generator stops the thread."""
    buffer: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's own clean-up (its read-ahead threads) runs now

    thread = threading.Thread(target=work, name="sae_jax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def read_ahead(items: Iterator, depth: int) -> Iterator:
    """`items` computed in a daemon thread up to `depth` ahead of the one the consumer holds:
    at most 1 + depth items exist at a time (the thread starts another only when the consumer
    has asked past one). Errors re-raise in the consumer; closing the returned generator stops
    the thread and closes `items` (in the thread that runs it)."""
    slots = threading.Semaphore(depth + 1)  # + 1: the item the consumer holds
    stop = threading.Event()

    def bounded() -> Iterator:
        try:
            while True:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                try:
                    item = next(items)
                except StopIteration:
                    return
                yield item
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    inner = prefetch(bounded(), depth)
    try:
        for item in inner:
            yield item
            slots.release()  # the consumer is done with `item`
    finally:
        stop.set()
        inner.close()
