"""Batches built ahead of the step: a producer thread, a bounded queue, host-to-device copies on a side stream.

The training thread should only ever launch compute. :class:`Prefetcher` runs the data source (the sampler,
the loader, the host-to-device copy) in a background thread up to ``depth`` batches ahead of the step that
consumes them, so building batch k+1..k+N overlaps step k; ``depth=0`` builds each batch in the caller's
thread when it is asked for (the serial behaviour). Either way the batches, their order and their values are
the source's: the producer is the only reader of the source iterator.

On CUDA the producer runs the source and ``prepare`` (copy to the device, channels-last) on its own stream, on
the training device (the current device is per thread). Each item carries an event recorded after its copies;
the consumer makes the compute stream wait on it (no host synchronisation in the training thread) and marks
the tensors as used by that stream, so the caching allocator cannot hand their memory to the side stream while
the step still reads them. The producer waits for its copies to finish before it queues the item. Host batches
with leased buffers are returned to their loader by the consumer (the trainer: ``Pretrainer._release_consumed``,
behind an event on the compute stream), never by the prefetcher.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher:
    """Iterate ``prepare(item)`` for each item of ``source``, built up to ``depth`` items ahead.

    ``source`` yields ``(tag, batch)`` pairs; iterating the prefetcher yields ``(tag, prepared, wait_s)``, where
    ``wait_s`` is how long the consumer waited for the item (the data path's share of the step).
    ``prepare(batch)`` returns a tuple or dict of tensors (on ``device``). Exceptions in the producer reach the consumer
    at the item where they happened. ``close()`` stops the producer (also on leaving a ``with`` block).
    """

    def __init__(self, source: Iterator, prepare: Callable[[object], tuple], device: torch.device, depth: int = 2):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.source = source
        self.prepare = prepare
        self.device = torch.device(device)
        self.depth = depth
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda and depth > 0 else None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._produce, name="pcrlv2-prefetch", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------------ producer
    def _build(self):
        """The next (tag, prepared tensors, event or None) from the source; _END when it is exhausted."""
        try:
            tag, batch = next(self.source)
        except StopIteration:
            return _END
        prepared = self.prepare(batch)
        if self._stream is None:
            return tag, prepared, None
        event = torch.cuda.Event()
        event.record(self._stream)
        # Queued once its copies are done: the producer never runs further ahead than its queue's depth.
        event.synchronize()
        return tag, prepared, event

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        device_ctx = torch.cuda.device(self.device) if self._cuda else nullcontext()
        stream_ctx = torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()
        try:
            with device_ctx, stream_ctx:
                while not self._stop.is_set():
                    item = self._build()
                    if not self._put(item) or item is _END:
                        return
        except BaseException as exc:  # handed to the consumer, which raises it at this item
            self._put(_Failure(exc))

    # ------------------------------------------------------------------------------------ consumer
    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        item = self._queue.get() if self._thread is not None else self._build()
        wait = time.perf_counter() - start
        if isinstance(item, _Failure):
            raise item.exc
        if item is _END:
            raise StopIteration
        tag, prepared, event = item
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in prepared.values() if isinstance(prepared, dict) else prepared:
                t.record_stream(compute)
        return tag, prepared, wait

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # Unblock a producer waiting to put, then wait for it to leave.
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
