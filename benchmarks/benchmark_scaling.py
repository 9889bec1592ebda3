"""Data-parallel scaling of the training loop: samples/s with 1 and N processes, weak-scaling efficiency.

Each configuration runs the real engine (``Pretrainer``: loader, three forward passes, objective, backward,
DistributedDataParallel with synchronised batch norm, optimizer) for ``--warmup + --steps`` steps on two
synthetic scans, in fresh processes that join the process group through the torchrun environment variables
(gloo on the CPU, NCCL on CUDA). Throughput is the median over the timed steps of rank 0's per-step samples/s
(global batch / wall time of the step, data loading included, checkpoint writes excluded).

Weak scaling: every process keeps ``--per-process-batch`` samples, so N processes train on an N times larger
global batch; efficiency = samples/s(N) / (N x samples/s(1)). On the CPU every process gets
``--threads-per-process`` intra-op threads, so the 1-process baseline runs with the same per-process threads
(on a 2-core machine: 2 processes x 1 thread against 1 process x 1 thread). Two control rows on the CPU:
``1proc-all-threads`` gives one process all the cores the N processes use together (intra-op threading
instead of data parallelism), and ``Nx1proc-independent`` runs N unrelated single-process runs at once and
adds their samples/s: the most N processes can reach on this machine at this moment, without any
communication, which separates the cost of DDP from contention for the cores (a shared or busy machine).

Usage: python benchmarks/benchmark_scaling.py [--device cpu|cuda] [--procs 1 2] [--width 4] [--steps 5] [--no-sync-bn]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import environment, median, write_rows  # noqa: E402

from pcrlv2_fast.data.synthetic import synthetic_volumes  # noqa: E402
from pcrlv2_fast.train import PretrainConfig, Pretrainer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, threads: int, cfg_kwargs: dict, independent: bool) -> None:
    """One process of a configuration: the torchrun environment, then the engine's own process-group setup.
    ``independent``: a single-process run of its own (own folder), started beside the others."""
    if independent:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        cfg_kwargs = {**cfg_kwargs, "out": f"{cfg_kwargs['out']}/run{rank}"}
    else:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    trainer = Pretrainer(PretrainConfig(**cfg_kwargs), synthetic_volumes())
    try:
        trainer.run()
    finally:
        trainer.close()


def timed_rates(folder: Path, warmup: int) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()][warmup:]
    return [r["samples_per_s"] for r in rows], [r["data_wait"] for r in rows]


def run_config(world: int, threads: int, args, out: Path, independent: bool = False) -> dict:
    per_run = 1 if independent else world
    cfg = dict(data="synthetic", out=str(out), width=args.width, batch_size=args.per_process_batch * per_run,
               steps=args.warmup + args.steps, pairs_per_volume=max(4, args.per_process_batch * per_run * 2),
               precision=args.precision, channels_last=args.channels_last, device=args.device, lr=1e-3,
               tensorboard=False, pictures=False, keep_checkpoints=0, seed=0, sync_bn=args.sync_bn,
               loader=args.loader)
    t0 = time.perf_counter()
    mp.start_processes(_worker, args=(world, free_port(), threads, cfg, independent), nprocs=world,
                       start_method="spawn")
    wall = time.perf_counter() - t0
    if independent:  # the runs' throughputs add up
        per_run_rates = [timed_rates(out / f"run{r}", args.warmup) for r in range(world)]
        sps = sum(median(rates) for rates, _ in per_run_rates)
        waits = [w for _, ws in per_run_rates for w in ws]
        n_timed = len(per_run_rates[0][0])
    else:
        rates, waits = timed_rates(out, args.warmup)
        sps, n_timed = median(rates), len(rates)
    global_batch = args.per_process_batch * world
    return {"processes": world, "threads_per_process": threads, "global_batch": global_batch,
            "per_process_batch": args.per_process_batch, "samples_per_s": sps, "s_per_step": global_batch / sps,
            "data_wait": median(waits), "timed_steps": n_timed, "launch_wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--procs", type=int, nargs="+", help="process counts (default: 1 2 on the CPU, 1 on one GPU, "
                   "1 and the GPU count with several GPUs)")
    p.add_argument("--threads-per-process", type=int, default=1, help="CPU intra-op threads of every process")
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--per-process-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over all configurations, interleaved so that changes in machine load hit each alike; "
                        "each row reports the median round")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--loader", default="auto", choices=["auto", "torch", "native", "dataset", "dali"],
                   help="batch loader (auto: native C++ on the CPU when built; use torch for GPU-side batches)")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="batch norm over all processes (the engine's default with several processes)")
    p.add_argument("--out", help="result JSON path (default benchmarks/results/scaling-<device>-<date>.json)")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.procs is None:
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        args.procs = [1, 2] if device.type == "cpu" else sorted({1, gpus})
    threads = args.threads_per_process if device.type == "cpu" else None  # GPU runs keep torch's CPU threads
    configs = [(n, threads, f"{n}proc", False) for n in args.procs]
    if device.type == "cpu" and max(args.procs) > 1:
        n = max(args.procs)
        configs += [(1, n * threads, "1proc-all-threads", False), (n, threads, f"{n}x1proc-independent", True)]

    env = environment(device)
    env["device"] = env["device"].split(" (")[0]  # the thread count is a column of each row
    settings = {"width": args.width, "precision": args.precision, "channels_last": args.channels_last,
                "sync_bn": args.sync_bn, "loader": args.loader}
    results: dict[str, list[dict]] = {name: [] for _, _, name, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for world, n_threads, name, independent in configs:
                print(f"round {rep + 1}/{args.repeats}, {name}: {world} process(es) x {n_threads} thread(s) ...",
                      flush=True)
                results[name].append(run_config(world, n_threads, args, Path(tmp) / f"{name}-{rep}", independent))
    rows = []
    for name, runs in results.items():
        result = sorted(runs, key=lambda r: r["samples_per_s"])[len(runs) // 2]
        rows.append({"benchmark": "scaling", "provider": name, **env, **settings, **result, "repeats": len(runs),
                     "samples_per_s_rounds": [r["samples_per_s"] for r in runs]})
    by_name = {r["provider"]: r for r in rows}
    base = by_name["1proc"]["samples_per_s"] if "1proc" in by_name else None
    for row in rows:
        if base and row["provider"] != "1proc-all-threads" and not row["provider"].endswith("independent"):
            row["weak_scaling_efficiency"] = row["samples_per_s"] / (row["processes"] * base)
        if base and row["provider"].endswith("independent"):
            row["efficiency_ceiling"] = row["samples_per_s"] / (row["processes"] * base)
    path = write_rows(rows, "scaling", device, args.out)
    print(f"\n{'provider':<20} {'procs x threads':>15} {'batch':>6} {'samples/s':>10} {'s/step':>8} {'data':>6} "
          f"{'weak eff.':>9}")
    for r in rows:
        eff = r.get("weak_scaling_efficiency", r.get("efficiency_ceiling"))
        eff = "-" if eff is None else f"{eff:.2f}" + ("" if "weak_scaling_efficiency" in r else " (ceiling)")
        threads = r["threads_per_process"] or "-"
        print(f"{r['provider']:<20} {r['processes']:>7} x {threads:<5} {r['global_batch']:>6} "
              f"{r['samples_per_s']:>10.3f} {r['s_per_step']:>8.3f} {r['data_wait']:>6.1%} {eff:>9}")
    print(f"device: {env['device']}, torch {env['torch']}; rows written to {path}")


if __name__ == "__main__":
    main()
