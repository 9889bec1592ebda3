"""The pretraining loop: one process or a torchrun launch (DistributedDataParallel), CPU or GPU, AMP and
channels_last_3d, exact resume, a clean stop on SIGTERM/SIGINT.

Reproducibility: the sample drawn at position i of epoch e is a pure function of (seed, e, i) (see
``PretrainDataset``), the batch order of an epoch a pure function of (seed, e), and the scale draws of a
step a pure function of (seed, step). A run resumed from a checkpoint therefore continues exactly as an
uninterrupted run would.

Scale: ``batch_size`` is the global batch of a step. With N processes and ``accumulate`` K, each process
takes its contiguous N-th of the step's items and runs it as K micro-batches (see ``distributed.py``);
every micro-batch uses the step's scale draws and the gradients are averaged, so the step optimises the
loss of the same global batch as a single process would. With synchronised batch norm (``sync_bn``, on by
default for several processes) and K = 1 the numbers equal the single-process run up to rounding; with
K > 1 batch norm sees each micro-batch separately. A run may resume with another number of processes.

The train package, by concern: ``config.py`` (options and presets), ``step.py`` (one optimisation step, the
same for the trainer, the benchmarks and the profiler), ``optim.py`` (optimizer and schedule), ``run_folder.py``
(checkpoints, resume), ``metrics.py`` (metric rows, pictures, summary, the non-finite guard), ``prefetch.py`` and
``distributed.py``; this module builds a run from them and loops.

Overlap: batches are built ahead by a producer thread (``prefetch``, see prefetch.py) and copied to the GPU on a
side stream. The step leaves its results on the device, and the loop reads loss terms, counters and the stop
agreement back every ``log_every`` steps only (10 by default on CUDA). A host batch is released to its loader
(buffer reuse) once the step after the one that read it begins.

Stopping: SIGTERM or SIGINT lets the current step finish, saves a checkpoint and returns normally (the
command exits 0); a second signal interrupts at once. The processes of a torchrun launch agree at every log
point on whether any of them was signalled, so all stop after the same step (torchrun forwards SIGTERM to
them; it reports the signal itself with a non-zero exit). ``--resume auto`` continues from the newest
readable checkpoint.

CUDA graphs are not supported (``step.CUDA_GRAPHS_UNSUPPORTED`` says why): the random per-step scale choice
changes the kernels of every step.
"""

from __future__ import annotations

import collections
import json
import math
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import (
    BatchLoader,
    CropConfig,
    PretrainDataset,
    ScanError,
    Volume,
    bank_bytes,
    cached_volumes,
    default_loader,
    gpu_cache_choice,
    is_cache,
    open_cache,
    resolve_loader,
)
from ..data.images2d import is_image_source
from ..data.native import available as native_available
from ..losses import PCRLv2Loss
from ..models import NonSkipUNet3D
from ..nn import fused_block_counts
from ..utils.device import resolve_device
from ..utils.io import atomic_write
from ..utils.lock import folder_lock
from . import distributed as D
from .config import PretrainConfig
from .metrics import NonFiniteLossError, RunLog, _Window
from .optim import build_optimizer, lr_at_epoch, optimizer_impl
from .prefetch import Prefetcher
from .run_folder import RunFolder
from .step import (
    AMP_DTYPES,
    SkipCounters,
    StepEngine,
    StepModule,
    StepOutput,
    pretrain_step,
    set_float32_precision,
    step_rng,
)
from .trace import StepTrace, parse_window, trace_name


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def local_batch(locals_: torch.Tensor) -> torch.Tensor:
    """(B, V, 1, X, Y, Z) -> (V*B, 1, X, Y, Z), view-major as the official ``torch.cat(local_views)``."""
    b, v = locals_.shape[:2]
    return locals_.transpose(0, 1).reshape(v * b, *locals_.shape[2:])


class Pretrainer(RunFolder, RunLog):
    """Builds data, model, objective and optimizer from a ``PretrainConfig`` and runs the loop.

    Under torchrun every process builds one; rank 0 alone writes checkpoints, metrics, event files, pictures
    and the summary. ``close()`` (called by :func:`pretrain`) leaves the process group it joined.
    """

    def __init__(self, cfg: PretrainConfig, volumes: list[Volume] | None = None):
        self.cfg = cfg.validate()
        self.out = Path(cfg.out)
        self.ddp = self.engine = None
        self.dist, self.device = D.init_distributed(resolve_device(cfg.device))
        if self.device.type == "cuda" and self.device.index is not None:
            # --device cuda:N in one process: libraries that use the current device (cuDNN handles, Triton
            # launches outside a guard) then use the run's GPU too.
            torch.cuda.set_device(self.device)
        try:
            self._build(volumes)
        except BaseException:
            self.close()
            raise

    def _build(self, volumes: list[Volume] | None) -> None:
        self._plan_batches()
        self._build_data(self._load_volumes() if volumes is None else volumes)
        self._build_model()
        self._build_engine()
        self.step = 0
        self._epoch = 0
        self.probe_scores: list[tuple[int, float]] = []  # (step, probe Dice) of this launch's probe points
        self.counters = SkipCounters(self.device)
        self.stop_signal: str | None = None
        self.resumed_from: Path | None = None
        self.skipped_checkpoints: list[Path] = []
        self._saved_step: int | None = None
        # Host batches in the order the feed yields them; the first _consumed were read by the last step.
        self._leased: collections.deque = collections.deque()
        self._consumed = 0

    def _plan_batches(self) -> None:
        """The micro-batch of each process and whether batch norm is synchronised, checked before any work."""
        cfg, world = self.cfg, self.dist.world_size
        if cfg.batch_size % (world * cfg.accumulate):
            raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be a multiple of processes x "
                             f"--accumulate = {world} x {cfg.accumulate}")
        self.micro_batch = cfg.batch_size // (world * cfg.accumulate)
        self.sync_bn = world > 1 and (cfg.sync_bn if cfg.sync_bn is not None else True)
        bn_rows = self.micro_batch * (world if self.sync_bn else 1)
        if bn_rows < 2:
            fixes = "raise --batch-size or lower --accumulate" + (" or use --sync-bn" if world > 1 else "")
            raise ValueError(
                f"each batch-norm batch would hold {bn_rows} sample (--batch-size {cfg.batch_size} over {world} "
                f"process(es) x {cfg.accumulate} micro-batch(es)); the projection BatchNorm1d layers need 2: {fixes}")

    def _build_data(self, volumes: list[Volume]) -> None:
        """The dataset, the loader that builds its batches, and the run's length in steps and epochs."""
        cfg = self.cfg
        self.dataset = PretrainDataset(volumes, CropConfig().scaled(cfg.crop_scale), seed=cfg.seed,
                                       pairs_per_volume=cfg.pairs_per_volume)
        # "dataset": per-sample items through a DataLoader (cfg.workers processes); "torch" / "native": whole
        # batches cut and augmented in one pass (same samples, see data/loader.py).
        self.loader_name = resolve_loader(default_loader() if cfg.loader == "auto" else cfg.loader)
        if self.loader_name == "torch" and self.device.type == "cuda":
            self.loader_name = self._fit_gpu_cache(volumes)
        if self.loader_name == "dali":
            from ..data.dali import DaliLoader

            self.batch_loader = DaliLoader(self.dataset, self.device, batch_size=self.micro_batch)
        else:
            self.batch_loader = None if self.loader_name == "dataset" else BatchLoader(
                self.dataset, self.loader_name, self.device if self.loader_name == "torch" else "cpu",
                num_threads=cfg.loader_threads, pin_memory=self.device.type == "cuda" and self.loader_name == "native")
        self._set_length(f"{len(volumes)} scans x {cfg.pairs_per_volume} pairs", "--pairs-per-volume")

    def _set_length(self, content: str, option: str) -> None:
        """Steps per epoch, total steps and epochs from the dataset's length (``content`` says what it holds)."""
        cfg = self.cfg
        self.steps_per_epoch = len(self.dataset) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch has only {len(self.dataset)} samples ({content}) but --batch-size is "
                             f"{cfg.batch_size}; lower --batch-size or raise {option}")
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    def _build_model(self) -> None:
        """The network on the device (synchronised batch norm, memory format), its optimizer and the objective."""
        cfg = self.cfg
        set_float32_precision(cfg.precision)
        torch.manual_seed(cfg.seed)
        # Fused kernels: the loss reads the low-resolution deep-supervision masks directly.
        model = NonSkipUNet3D(width=cfg.width, norm=cfg.norm, act=cfg.act, kernels=cfg.kernels,
                              upsample_masks=cfg.kernels == "torch")
        if self.sync_bn:
            model = D.convert_sync_batchnorm(model, self.device)
        # Counted after the SyncBatchNorm conversion: what the run's blocks will really execute.
        self.fused_blocks = fused_block_counts(model, self.device)
        self.memory_format = torch.channels_last_3d if cfg.channels_last else torch.contiguous_format
        self.model = model.to(self.device).to(memory_format=self.memory_format)
        self.optimizer = build_optimizer(cfg, self.model)
        self.optim_impl = optimizer_impl(cfg.optim_impl, self.device)
        self.loss_fn = PCRLv2Loss(total_epochs=self.total_epochs, n_local=self.dataset.crop.n_local,
                                  all_scales=cfg.all_scales, kernels=cfg.kernels)

    def _build_engine(self) -> None:
        """The step's module (compiled, DDP-wrapped under torchrun), precision and gradient scaler."""
        cfg = self.cfg
        self.amp_dtype = AMP_DTYPES.get(cfg.precision)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.step_module = StepModule(self.model, self.loss_fn, self.forward)
        if self.dist.enabled:
            # Random scales leave some heads without a gradient in a step (the same ones on every rank); with
            # all_scales every parameter is used. Synchronised batch norm keeps the buffers equal on all ranks.
            self.ddp = D.wrap_ddp(self.step_module, self.device, find_unused_parameters=not cfg.all_scales,
                                  sync_buffers=not self.sync_bn)
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.engine = StepEngine(self.ddp or self.step_module, self.optimizer, scaler,
                                 list(self.model.parameters()), list(self.model.buffers()), self.amp_dtype,
                                 cfg.skip_loss_above, self.dist)

    def _fit_gpu_cache(self, volumes: list[Volume]) -> str:
        """The torch loader keeps every volume on the GPU: only within --gpu-cache-gb (default a quarter of the
        free memory); above it the native loader. The choice is printed."""
        loader, message = gpu_cache_choice(bank_bytes(volumes), self._gpu_cache_budget(), native_available())
        if self.dist.is_main:
            print(message, file=sys.stderr)
        return loader

    def _gpu_cache_budget(self) -> float:
        """Bytes of GPU memory the data may fill: --gpu-cache-gb, by default a quarter of the free memory."""
        if self.cfg.gpu_cache_gb is not None:
            return self.cfg.gpu_cache_gb * 2**30
        return torch.cuda.mem_get_info(self.device)[0] / 4

    def _load_volumes(self) -> list[Volume]:
        """Raw scans are preprocessed into OUT/cache first (resumable); with several processes rank 0 does it and
        the others open the finished cache. A cache given as --data is memory-mapped as it is."""
        cfg = self.cfg
        if is_image_source(cfg.data):
            raise ScanError(f"{cfg.data} holds 2D images (PNG, JPEG or DICOM files, or an NIH image CSV) and no 3D "
                            "scans: pretrain on them with --dims 2")
        s = cfg.spacing
        kwargs = dict(spacing=(s, s, s), modality=cfg.modality, workers=max(1, cfg.workers),
                      min_shape=CropConfig().scaled(cfg.crop_scale).min_volume)
        if not self.dist.enabled or is_cache(cfg.data):
            return cached_volumes(cfg.data, self.out / "cache", **kwargs)
        payload, volumes = None, None
        if self.dist.is_main:
            try:
                volumes = cached_volumes(cfg.data, self.out / "cache", **kwargs)
                payload = ("ok", [v.name for v in volumes])
            except Exception as exc:
                D.broadcast_object(("error", f"{type(exc).__name__}: {exc}"), self.dist)
                raise
        payload = D.broadcast_object(payload, self.dist)
        if self.dist.is_main:
            return volumes
        if payload[0] == "error":
            raise ScanError(f"rank 0 could not prepare the data: {payload[1]}")
        return open_cache(self.out / "cache", names=payload[1])

    def close(self) -> None:
        """Leave the process group this trainer joined (the DDP wrapper goes first: it holds the group)."""
        self.ddp = self.engine = None
        D.destroy(self.dist)

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """The gradient scaler the step uses (disabled unless --precision fp16); the engine owns it."""
        return self.engine.scaler

    @scaler.setter
    def scaler(self, scaler: torch.amp.GradScaler) -> None:
        self.engine.scaler = scaler

    def resolved(self) -> dict:
        """What the configuration turned into on this launch."""
        return {
            "device": str(self.device), "world_size": self.dist.world_size, "micro_batch": self.micro_batch,
            "accumulate": self.cfg.accumulate, "sync_bn": self.sync_bn, "optim_impl": self.optim_impl,
            "loader": self.loader_name, "prefetch": self.prefetch, "log_every": self.log_every,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "total_epochs": self.total_epochs, "torch": torch.__version__,
        }

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def train_step(self, batch: dict | list[dict], epoch: int) -> StepOutput:
        """One optimizer step on this process's micro-batches (a batch dict, or a list of ``accumulate`` of them;
        dicts from :meth:`device_batch` are used as they are)."""
        micro = [self.device_batch(mb) for mb in (batch if isinstance(batch, list) else [batch])]
        views = [(mb["x1"], mb["x2"], mb["gt"], mb["loc"]) for mb in micro]
        return pretrain_step(self.engine, views, epoch, step_rng(self.cfg.seed, self.step))

    def batch_indices(self, epoch: int, start: int) -> list[list[int]]:
        """This process's micro-batches (item indices) for steps ``start ..`` of ``epoch``, in order."""
        order = epoch_order(self.cfg.seed, epoch, len(self.dataset))
        bs = self.cfg.batch_size
        # Incomplete last batches are dropped: the projection BatchNorm1d layers fail on a batch of one.
        out = []
        for i in range(start, self.steps_per_epoch):
            out += D.rank_micro_batches(order[i * bs:(i + 1) * bs].tolist(), self.dist.rank, self.dist.world_size,
                                        self.cfg.accumulate)
        return out

    def batches(self, epoch: int, start: int):
        """This process's micro-batches for steps ``start ..`` of ``epoch`` (``accumulate`` per step)."""
        batch_indices = self.batch_indices(epoch, start)
        self.dataset.set_epoch(epoch)
        if self.batch_loader is not None:
            return self.batch_loader.batches(batch_indices)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batch_indices, num_workers=self.cfg.workers,
                                           pin_memory=self.device.type == "cuda")

    def run(self) -> dict:
        """Train to the end (or a stop signal) and return the summary. The main process holds the run folder's lock
        throughout: a second run pointed at the same --out is refused while this one runs."""
        if not self.dist.is_main:
            return self._run()
        with folder_lock(self.out, "pretrain", hint="wait for it to end, or choose another --out"):
            return self._run()

    def _run(self) -> dict:
        cfg, main = self.cfg, self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            for tmp in self.out.glob(".*.tmp"):  # left by a save that a SIGKILL or power loss interrupted
                tmp.unlink(missing_ok=True)
        D.barrier(self.dist)
        resumed = self._resume_for_run() is not None
        if not resumed and main:
            # --resume auto without a checkpoint (a run killed before its first save) starts again.
            self._claim_run_folder(force=cfg.overwrite or cfg.resume == "auto")
        D.barrier(self.dist)
        if main:
            with atomic_write(self.out / "config.json", "w") as f:
                json.dump({**cfg.to_dict(), "resolved": self.resolved()}, f, indent=2)
        self.model.train()
        if main:
            print(f"fused blocks: conv {self.fused_blocks['conv']}, norm+act {self.fused_blocks['norm_act']} "
                  f"(--kernels {cfg.kernels}, {self.dist.world_size} process(es), {self.device})", file=sys.stderr)
        rates, last = [], None
        writer = self._open_tensorboard(resumed) if main else None
        metrics = open(self.out / "metrics.jsonl", "a") if main else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True,
                   disable=not main)
        handlers = self._catch_stop_signals()
        try:
            last = self._loop(rates, metrics, writer, bar)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            bar.close()
            if metrics is not None:
                metrics.close()
            if writer is not None:
                writer.close()
        return self.finish(rates, last)

    def _micro_batches(self):
        """(epoch, micro-batch) for this process, from the current step to the end of the run, epoch after epoch."""
        step = self.step
        while step < self.total_steps:
            epoch, start = divmod(step, self.steps_per_epoch)
            for batch in self.batches(epoch, start):
                self._leased.append(batch)  # released after the step that reads it (see _release_consumed)
                yield epoch, batch
            step = (epoch + 1) * self.steps_per_epoch

    def device_batch(self, batch: dict) -> dict:
        """x1, x2, gt and loc (the local views batched view-major) of a batch on the device, in the model's memory
        format: what a step reads (made by the prefetching thread, ahead of the step)."""
        out = {key: self.to_device(batch[key]) for key in ("x1", "x2", "gt")}
        # The pinned host batch is copied as it is; the view-major reordering runs on the device.
        loc = batch["loc"] if "loc" in batch else local_batch(batch["locals"].to(self.device, non_blocking=True))
        out["loc"] = self.to_device(loc)
        return out

    def _loop(self, rates: list[float], metrics, writer, bar) -> StepOutput | None:
        cfg, last = self.cfg, None
        self._leased.clear()
        self._consumed = 0
        feed = Prefetcher(self._micro_batches(), self.device_batch, self.device, depth=self.prefetch)
        trace = self._step_trace()
        window = _Window()
        probe = self._build_probe()
        try:
            if self.step == 0:
                self._probe_point(probe, metrics, writer)  # the starting point: the network before training
            while self.step < self.total_steps:
                if trace is not None:
                    trace.before_step(self.step + 1)
                last = self._one_step(feed, window)
                if trace is not None:
                    trace.after_step(self.step)
                stop = self._at_log_point(last, window, rates, metrics, writer, bar)
                if self.step % self.probe_every == 0 or self.step == self.total_steps or stop:
                    self._probe_point(probe, metrics, writer)
                bar.update(1)
                if self.step % self.steps_per_epoch == 0 or (cfg.save_every and self.step % cfg.save_every == 0):
                    self.save()
                if stop:
                    self.stop_signal = self.stop_signal or "a signal to another process"
                    path = self.save()
                    if self.dist.is_main:
                        print(f"\nstopped by {self.stop_signal} after step {self.step}; saved {path} "
                              "(continue with --resume auto)", file=sys.stderr)
                    break
        finally:
            feed.close()
            if trace is not None:
                trace.close()
        self.save()
        return last

    def _step_trace(self) -> StepTrace | None:
        """--profile-steps A:B: the trace of those steps (OUT/trace.pt.trace.json; see trace.py)."""
        if self.cfg.profile_steps is None:
            return None
        return StepTrace(parse_window(self.cfg.profile_steps), self.out / trace_name(self.dist.rank), self.device)

    def _one_step(self, feed: Prefetcher, window: _Window) -> StepOutput:
        """Take one step's micro-batches from the feed and run the step (nothing is read back from the device)."""
        cfg = self.cfg
        self._release_consumed()
        self._consumed = 0
        micro = []
        for _ in range(cfg.accumulate):
            epoch, batch, waited = next(feed)
            micro.append(batch)
            window.wait += waited
        self._epoch = epoch
        self._consumed = cfg.accumulate
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at_epoch(cfg.lr, epoch, self.total_epochs)
        last = self.train_step(micro, epoch)
        self.step += 1
        window.steps += 1
        self.counters.add(last.code)
        return last

    def _release_consumed(self) -> None:
        """Hand the previous step's host batches back to the loader (buffer reuse). On CUDA the buffers wait
        for an event recorded now on the compute stream: everything queued so far, the step and any copy of
        those batches included, has run before they are written again."""
        after = None
        if self.device.type == "cuda":
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.device))
        for _ in range(self._consumed):
            batch = self._leased.popleft()
            if hasattr(batch, "release"):
                batch.release(after)

    @property
    def prefetch(self) -> int:
        """--prefetch, or by default 2 on CUDA and 0 on the CPU, where the producer thread competes with the step
        for the cores (benchmarks/README.md, design measurements)."""
        if self.cfg.prefetch is not None:
            return self.cfg.prefetch
        return 2 if self.device.type == "cuda" else 0

    @property
    def probe_every(self) -> int:
        """--probe-every, or by default once per epoch."""
        return self.cfg.probe_every or self.steps_per_epoch

    @property
    def log_every(self) -> int:
        """--log-every, or by default every step on the CPU and every 10 steps on CUDA (each read waits for the GPU)."""
        if self.cfg.log_every is not None:
            return self.cfg.log_every
        return 10 if self.device.type == "cuda" else 1

    def _catch_stop_signals(self) -> dict:
        """SIGTERM / SIGINT set a flag that ends the loop after the current step (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_stop_signal)
        return previous

    def _on_stop_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name
        if self.dist.is_main:
            print(f"\n{self.stop_signal}: finishing step {self.step + 1}, then saving a checkpoint (send it again to "
                  "stop at once)", file=sys.stderr)


def pretrain(cfg: PretrainConfig, volumes: list[Volume] | None = None) -> dict:
    trainer = Pretrainer(cfg, volumes)
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = ["NonFiniteLossError", "Pretrainer", "pretrain"]
