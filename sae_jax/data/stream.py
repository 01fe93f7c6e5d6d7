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
