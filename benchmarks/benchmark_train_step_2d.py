"""One 2D PCRLv2 training step (chest X-ray network): this engine vs the official eager fp32 step, in one run.

Both run the step of ``train_2d.py`` on the same views (per sample two 224-pixel global views, a target and six
96-pixel local views, 3 channels): three forward passes (x1, x2, all local views batched), the objective, backward
and an SGD step (momentum 0.9, weight decay 1e-4).
- ``eager_fp32``: the official way: fp32, contiguous tensors, the deep-supervision heads and the full-size masks
  computed for the local views too (the official forward never passes ``local``), plain ``torch.optim.SGD``.
- ``engine_fp32``: ``pretrain_step`` (the trainer's own step) in fp32, contiguous: the local views skip the
  heads the objective never reads; the trainer's optimizer.
- ``engine``: the same with the engine's settings (bf16 autocast, channels_last).
Steps are timed round-robin after a warm-up, medians reported.

Usage: python benchmarks/benchmark_train_step_2d.py [--device cpu|cuda] [--batch-size 8] [--steps 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import environment, median, time_call, write_rows  # noqa: E402

from pcrlv2_fast.losses import PCRLv2Loss  # noqa: E402
from pcrlv2_fast.models import NonSkipUNet2D  # noqa: E402
from pcrlv2_fast.train import PretrainConfig  # noqa: E402
from pcrlv2_fast.train.optim import build_optimizer  # noqa: E402
from pcrlv2_fast.train.step import StepEngine, pretrain_step  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    b = args.batch_size
    gen = torch.Generator().manual_seed(0)
    x1, x2, gt = (torch.randn(b, 3, 224, 224, generator=gen).to(device) for _ in range(3))
    loc = torch.randn(6 * b, 3, 96, 96, generator=gen).to(device)
    loss_fn = PCRLv2Loss(total_epochs=240)
    torch.manual_seed(0)
    official = NonSkipUNet2D().to(device)
    official_opt = torch.optim.SGD(official.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def eager_step():
        rec, f1, masks = official(x1)
        _, f2, _ = official(x2)
        _, fl, _ = official(loc)  # the official forward: heads and masks for the local views as well
        loss = loss_fn(rec, masks, f1, f2, fl, gt, 0, random.Random(0)).total
        official_opt.zero_grad(set_to_none=True)
        loss.backward()
        official_opt.step()

    def engine(precision: str, channels_last: bool):
        model = NonSkipUNet2D().to(device)
        model.load_state_dict(official.state_dict())
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        views = [tuple(t.contiguous(memory_format=fmt) for t in (x1, x2, gt, loc))]
        amp = torch.bfloat16 if precision == "bf16" else None
        eng = StepEngine.build(model, loss_fn, build_optimizer(PretrainConfig(lr=1e-3), model), amp_dtype=amp)
        return lambda: pretrain_step(eng, views, 0, random.Random(0))

    providers = {"eager_fp32": eager_step, "engine_fp32": engine("fp32", False), "engine": engine("bf16", True)}
    settings = {"eager_fp32": ("fp32", False), "engine_fp32": ("fp32", False), "engine": ("bf16", True)}
    for fn in providers.values():
        for _ in range(args.warmup):
            time_call(fn, device)
    times = {name: [] for name in providers}
    for i in range(args.steps):  # round-robin: drift in the machine's load hits every provider alike
        for name, fn in providers.items():
            times[name].append(time_call(fn, device))
            print(f"{name}: step {i + 1}/{args.steps} {times[name][-1]:.3f} s", flush=True)
    base = median(times["eager_fp32"])
    rows = []
    for name, ts in times.items():
        s = median(ts)
        precision, channels_last = settings[name]
        rows.append({"benchmark": "train_step_2d", "provider": name, "precision": precision,
                     "channels_last": channels_last, "batch_size": b, "steps": args.steps, "s_per_step": s,
                     "samples_per_s": b / s, "speedup_vs_eager_fp32": base / s, "threads": torch.get_num_threads(),
                     "command": "python benchmarks/benchmark_train_step_2d.py", **env})
        print(f"{name:<12} {s:8.3f} s/step {b / s:8.2f} samples/s {base / s:6.2f}x")
    print(f"wrote {write_rows(rows, 'train_step2d', device, out=args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
