"""``robprune bench --nproc N``: data-parallel scaling of the adversarial training step, measured in one command.

Two launches of the same step, one after the other: one process (no DDP), then N ranks through
torch.distributed.run (DDP, gloo on CPUs, NCCL on GPUs). Each rank trains on ``batch`` examples per step (the
global batch is N x batch: weak scaling, the usual way to state DDP's efficiency), with the engine's own
:func:`~robprune.engine.pipeline.adversarial_step` (ADMM penalty included, as in the admm phase). Every process
times ``repeats`` blocks of ``iters`` steps after ``warmup`` steps and reports its median images/s; the ranks'
numbers are gathered to rank 0, which writes them for the launcher. Efficiency = total images/s of the N ranks
/ (N x one process's).

On one CPU machine the ranks share the cores, so the number is a smoke test (the ranks run one thread each, as
torchrun sets them, against one process with one thread); on a machine with N GPUs it is the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

WORKER_ARGS = ("model", "width", "batch", "attack", "steps", "device", "warmup", "iters", "repeats", "threads",
               "depth")


def _worker(a: argparse.Namespace) -> None:
    """One process of the measurement (a rank when torchrun started it)."""
    from . import distributed as dist_mod
    from .admm import ADMM
    from .bench import CIFAR_ATTACK, MNIST_ATTACK, _input_shape, _pruned_setup, _sync
    from .config import PhaseConfig
    from .models import build_model
    from .pipeline import adversarial_step, make_optimizer

    if a.threads:
        torch.set_num_threads(a.threads)
    dist = dist_mod.DistContext.from_env()
    want = dist_mod.device_type(a.device)
    if dist is not None:
        dist.init(want, 600.0)
    dev = dist.device(want) if dist is not None else torch.device(want)
    in_ch, side = _input_shape(a.model)
    eps, step_size = MNIST_ATTACK if a.model == "lenet" else CIFAR_ATTACK
    torch.manual_seed(0)
    net = build_model(a.model, a.width, num_classes=10, in_channels=in_ch, image_size=side, depth=a.depth).to(dev)
    params, ratios, schemes = _pruned_setup(net, 0.9)
    admm = ADMM(params, ratios, schemes, 1e-3)
    train_fn = net
    if dist is not None:
        train_fn = dist.wrap(net, dev)
    opt = make_optimizer(PhaseConfig(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4), net.parameters(), dev)
    world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
    gen = torch.Generator().manual_seed(rank)
    xs = [torch.rand(a.batch, in_ch, side, side, generator=gen).to(dev) for _ in range(4)]
    ys = [torch.randint(0, 10, (a.batch,), generator=gen).to(dev) for _ in range(4)]
    total = a.batch * world
    rows = (rank * a.batch, (rank + 1) * a.batch, total) if dist is not None else None

    def step(i: int) -> None:
        adversarial_step(net, train_fn, opt, xs[i % 4], ys[i % 4], kind=a.attack, eps=eps, step_size=step_size,
                         steps=a.steps, admm=admm, rows=rows, grad_scale=world / total if dist else None)

    for i in range(a.warmup):
        step(i)
    rates = []
    for _ in range(a.repeats):
        if dist is not None:
            dist.barrier()
        _sync(dev)
        t0 = time.perf_counter()
        for i in range(a.iters):
            step(i)
        _sync(dev)
        rates.append(a.iters * a.batch / (time.perf_counter() - t0))
    mine = {"rank": rank, "images_per_s": statistics.median(rates), "runs": rates, "device": str(dev),
            "threads": torch.get_num_threads()}
    everyone = dist.all_gather(mine) if dist is not None else [mine]
    if rank == 0:
        Path(a.out).write_text(json.dumps({"ranks": everyone, "backend": dist.backend if dist else None}))
    if dist is not None:
        dist.barrier()
        del train_fn, step  # (the DDP wrapper holds the process group)
        dist_mod.exit_rank(dist, None, 0)


def run_dist_bench(nproc: int, *, model: str = "lenet", width: int = 4, batch: int = 128, attack: str = "pgd",
                   steps: int = 10, device: str = "auto", warmup: int = 2, iters: int = 5, repeats: int = 3,
                   threads: int = 0, depth: int = 28, say=print) -> dict:
    """One process, then ``nproc`` ranks (see the module docstring); the merged numbers as a dict."""
    from .distributed import launch

    values = dict(model=model, width=width, batch=batch, attack=attack, steps=steps, device=device, warmup=warmup,
                  iters=iters, repeats=repeats, threads=threads, depth=depth)
    with tempfile.TemporaryDirectory(prefix="robprune-dist-bench-") as tmp:
        def args(out: str) -> list[str]:
            return [*(x for k in WORKER_ARGS for x in (f"--{k}", str(values[k]))), "--out", out]

        one, many = os.path.join(tmp, "one.json"), os.path.join(tmp, "many.json")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # as torchrun's ranks
        import subprocess

        proc = subprocess.run([sys.executable, "-m", "robprune.engine.dist_bench", *args(one)], env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"the one-process measurement failed (exit code {proc.returncode})")
        code = launch(nproc, ["-m", "robprune.engine.dist_bench", *args(many)], say=say, run_dir="")
        if code != 0:
            raise RuntimeError(f"the {nproc}-rank measurement failed (exit code {code})")
        single = json.loads(Path(one).read_text())["ranks"][0]
        ranks = json.loads(Path(many).read_text())
    total = sum(r["images_per_s"] for r in ranks["ranks"])
    return {
        "nproc": nproc, "backend": ranks["backend"], "per_rank_batch": batch, "global_batch": batch * nproc,
        "settings": values, "one_process": single,
        "ranks": ranks["ranks"], "images_per_s_per_rank": [r["images_per_s"] for r in ranks["ranks"]],
        "images_per_s_total": total, "speedup": total / single["images_per_s"],
        "scaling_efficiency": total / (nproc * single["images_per_s"]),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m robprune.engine.dist_bench")
    for k in WORKER_ARGS:
        p.add_argument(f"--{k}", type=str if k in ("model", "attack", "device") else int, required=True)
    p.add_argument("--out", required=True)
    _worker(p.parse_args(argv))


if __name__ == "__main__":
    main()
