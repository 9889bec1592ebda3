"""The prefetching producer: overlap of data and step, the same batches as the serial path, clean failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pcrlv2_fast.train import PretrainConfig, Pretrainer
from pcrlv2_fast.train.prefetch import Prefetcher

CPU = torch.device("cpu")


def slow_source(n: int, seconds: float, made: list | None = None):
    for i in range(n):
        time.sleep(seconds)  # a loader that needs `seconds` per batch (sleeping: independent of the CPU's load)
        if made is not None:
            made.append(i)
        yield i, torch.full((2,), float(i))


def run(depth: int, n: int = 8, data_s: float = 0.05, step_s: float = 0.05) -> tuple[float, list, float]:
    start, seen, waited = time.perf_counter(), [], 0.0
    with Prefetcher(slow_source(n, data_s), lambda b: (b,), CPU, depth=depth) as feed:
        for tag, (batch,), wait in feed:
            time.sleep(step_s)  # a step that takes `step_s`
            seen.append((tag, batch.tolist()))
            waited += wait
    return time.perf_counter() - start, seen, waited


def test_prefetch_overlaps_data_and_step():
    serial_wall, serial, serial_wait = run(depth=0)
    wall, seen, wait = run(depth=2)
    assert seen == serial == [(i, [float(i)] * 2) for i in range(8)]
    # Serial: data + step per item (~0.8 s); prefetched: max(data, step) per item plus one batch (~0.45 s).
    assert serial_wall > 8 * 0.1 * 0.95
    assert wall < 0.75 * serial_wall, (wall, serial_wall)
    assert wait < 0.5 * serial_wait  # the step rarely waits for data


def test_producer_stays_within_its_depth_and_stops_on_close():
    made = []
    feed = Prefetcher(slow_source(100, 0.001, made), lambda b: (b,), CPU, depth=2)
    next(feed)
    time.sleep(0.2)
    # One taken, two queued, at most one being built.
    assert 3 <= len(made) <= 4
    feed.close()
    count = len(made)
    time.sleep(0.05)
    assert len(made) == count and not any(t.name == "pcrlv2-prefetch" for t in threading.enumerate())


def test_a_failing_source_raises_in_the_consumer_at_its_item():
    def source():
        yield 0, torch.zeros(1)
        raise OSError("volume 3: truncated memory map")

    for depth in (0, 2):
        feed = Prefetcher(source(), lambda b: (b,), CPU, depth=depth)
        assert next(feed)[0] == 0
        with pytest.raises(OSError, match="truncated memory map"):
            next(feed)
        feed.close()


def test_negative_depth_is_refused():
    with pytest.raises(ValueError, match="prefetch depth"):
        Prefetcher(iter(()), lambda b: (b,), CPU, depth=-1)


def _tiny(tmp_path, name, **kw):
    return PretrainConfig.from_name("tiny", data="unused", out=str(tmp_path / name), pairs_per_volume=3, **kw)


def _state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_training_with_prefetch_is_bit_equal_to_serial_also_across_resume(tmp_path, phantom_volumes, monkeypatch):
    runs = {}
    for depth in (0, 2):
        trainer = Pretrainer(_tiny(tmp_path, f"d{depth}", steps=5, prefetch=depth), phantom_volumes)
        trainer.run()
        rows = (tmp_path / f"d{depth}" / "metrics.jsonl").read_text().splitlines()
        runs[depth] = (_state(trainer), rows)
    serial_state, serial_rows = runs[0]
    state, rows = runs[2]
    for name, value in serial_state.items():
        assert torch.equal(state[name], value), name
    losses = [[r.split('"loss": ')[1].split(",")[0] for r in rs] for rs in (serial_rows, rows)]
    assert losses[0] == losses[1] and len(losses[0]) == 5

    # Prefetching run stopped after step 3 (the producer already built later batches), then resumed.
    original = Pretrainer.train_step
    calls = {"n": 0}

    def stop_after_third(self, batch, epoch):
        out = original(self, batch, epoch)
        calls["n"] += 1
        if calls["n"] == 3:
            self.stop_signal = "SIGTERM"
        return out

    monkeypatch.setattr(Pretrainer, "train_step", stop_after_third)
    Pretrainer(_tiny(tmp_path, "cut", steps=5, prefetch=2), phantom_volumes).run()
    monkeypatch.setattr(Pretrainer, "train_step", original)
    resumed = Pretrainer(_tiny(tmp_path, "cut", steps=5, prefetch=2, resume="auto"), phantom_volumes)
    resumed.run()
    assert resumed.step == 5
    for name, value in serial_state.items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_metrics_record_the_data_wait(tmp_path, phantom_volumes):
    import json

    Pretrainer(_tiny(tmp_path, "w", steps=2, prefetch=1, loader_threads=1), phantom_volumes).run()
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["data_wait_s"] >= 0 and 0 <= r["data_wait"] <= 1
    with pytest.raises(ValueError, match="loader_threads"):
        _tiny(tmp_path, "x", loader_threads=0).validate()
    with pytest.raises(ValueError, match="prefetch"):
        _tiny(tmp_path, "x", prefetch=-1).validate()
