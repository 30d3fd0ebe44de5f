"""Training images/s: one Ray Train worker running the train job's step vs a plain PyTorch loop.

Both sides train the same seeded model on the same batches (procedural images, generated from the
same seed in each process and checked equal) for the same number of steps, with random crops and
flips and filter renormalization: the plain side calls ``zfcore.training.train_step`` directly,
the Ray side runs ``jobs.train.step.TrainStepper`` on ``ray.train.torch.prepare_model``'s model
inside a ``TorchTrainer`` worker. The sides take turns (plain, Ray, plain, Ray), each turn a few
timed rounds, and the best and median round of each side are printed side by side with their
ratio. On a GPU both use bf16 autocast and
channels-last; the uint8 batches are copied from pinned memory every step, as in the job.

    .venv/bin/python benchmarks/train.py                                   # zfnet-small, 64px
    .venv/bin/python benchmarks/train.py --variant zfnet --image-size 224  # the paper's network
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from jobs.runtime.device import memory_format, to_device, tune_convolutions
from jobs.train.step import TrainStepper, with_precision
from zfcore.data import ProceduralDataset
from zfcore.training import augment, train_step
from zfcore.zfnet import ZFNet, build

Batches = list[tuple[np.ndarray, np.ndarray]]


def make_batches(size: int, batch_size: int, count: int) -> tuple[Batches, str]:
    """``count`` uint8 batches of procedural images, and a digest to check both sides got the same."""
    data = ProceduralDataset(batch_size * count, size, seed=0)
    batches = [data.batch(range(i * batch_size, (i + 1) * batch_size)) for i in range(count)]
    digest = hashlib.sha256(b"".join(x.tobytes() + y.tobytes() for x, y in batches)).hexdigest()[:12]
    return batches, digest


def setup(args: dict[str, Any], device: torch.device) -> tuple[ZFNet, torch.nn.Module, torch.optim.Optimizer]:
    tune_convolutions(device)
    torch.manual_seed(0)
    model = build(args["variant"], num_classes=10)
    model = model.train().to(device, memory_format=memory_format(device))
    forward = with_precision(model, args["precision"], device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return model, forward, optimizer


def timed_rounds(
    step: Any, batches: Batches, args: dict[str, Any], device: torch.device, rounds: int
) -> list[float]:
    """Images/s of each round of ``args["steps"]`` steps, after ``args["warmup"]`` untimed ones."""
    for i in range(args["warmup"]):
        step(*batches[i % len(batches)])
    out = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for i in range(args["steps"]):
            step(*batches[i % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(args["steps"] * args["batch_size"] / (time.perf_counter() - t))
    return out


def plain_loop(args: dict[str, Any], batches: Batches, rounds: int) -> list[float]:
    """The baseline: zfcore's step in a plain loop, in this process."""
    torch.set_num_threads(args["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, forward, optimizer = setup(args, device)
    generator = torch.Generator().manual_seed(0)

    def step(images: np.ndarray, labels: np.ndarray) -> None:
        x = augment(to_device(images, device), generator)
        y = torch.from_numpy(labels).to(device, non_blocking=True)
        train_step(forward, optimizer, x, y, renorm_radius=0.1)

    return timed_rounds(step, batches, args, device, rounds)


def ray_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's train_loop_per_worker: the train job's step on the prepared model."""
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    model, forward, optimizer = setup(config, device)
    prepared = ray.train.torch.prepare_model(forward, move_to_device=device)
    stepper = TrainStepper(model, prepared, optimizer, device, renorm_radius=0.1, augment_images=True,
                           generator=torch.Generator().manual_seed(0))
    batches, digest = make_batches(config["image_size"], config["batch_size"], config["batches"])
    rates = timed_rounds(stepper.step, batches, config, device, config["rounds"])
    return {"rates": rates, "digest": digest, "device": str(device)}


def ray_rounds(args: dict[str, Any], rounds: int) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    resources = {"CPU": args["threads"], **({"GPU": 1} if cuda else {})}
    with tempfile.TemporaryDirectory(prefix="zfatlas-bench-") as storage:  # Ray Train's run state
        trainer = TorchTrainer(
            ray_worker,
            train_loop_config={**args, "rounds": rounds},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=cuda, resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
            run_config=RunConfig(storage_path=storage),
        )
        return trainer.fit().return_value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="zfnet-small")
    p.add_argument("--image-size", type=int, default=None, help="default: the variant's")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: 128 on GPU (the paper's), 64 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round; default 50 GPU, 20 CPU")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per side in each turn")
    p.add_argument("--turns", type=int, default=2,
                   help="turns per side, alternating (each Ray turn is one TorchTrainer.fit)")
    p.add_argument("--settle", type=float, default=3.0, help="idle seconds before each turn")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on each side")
    a = p.parse_args()

    cuda = torch.cuda.is_available()
    args = {
        "variant": a.variant,
        "image_size": a.image_size or build(a.variant).config.image_size,
        "batch_size": a.batch_size or (128 if cuda else 64),
        "steps": a.steps or (50 if cuda else 20),
        "warmup": a.warmup,
        "batches": a.batches,
        "precision": ("bf16" if cuda else "fp32") if a.precision == "auto" else a.precision,
        "threads": a.threads,
    }
    if args["image_size"] != build(a.variant).config.image_size:
        raise SystemExit(f"{a.variant} is built for {build(a.variant).config.image_size}px images")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray on loopback only
    # A fresh local Ray sized to the two sides (never another cluster on the machine).
    ray.init(address="local", num_cpus=args["threads"], num_gpus=1 if cuda else 0, include_dashboard=False,
             log_to_driver=False)
    batches, digest = make_batches(args["image_size"], args["batch_size"], args["batches"])
    device = torch.cuda.get_device_name() if cuda else f"CPU, {args['threads']} torch threads"
    load = os.getloadavg()
    print(f"load average at start {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"
          + ("" if load[0] < 1 else " (NOT QUIET: the ratio below is not quotable)"))
    print(f"{a.variant} at {args['image_size']}px, batch {args['batch_size']}, {args['precision']}, "
          f"{args['steps']} timed steps per round after {args['warmup']} warm-up ({device})")

    plain: list[float] = []
    worker: list[float] = []
    for _ in range(a.turns):  # alternate, so drifting machine load hits both sides alike
        time.sleep(a.settle)  # let Ray's start-up or the last trainer's teardown finish first
        plain += plain_loop(args, batches, a.rounds)
        time.sleep(a.settle)
        out = ray_rounds(args, a.rounds)
        if out["digest"] != digest:
            raise SystemExit("the Ray worker generated different batches")
        worker += out["rates"]
    best_p, best_w = max(plain), max(worker)
    med_p, med_w = statistics.median(plain), statistics.median(worker)
    print(f"{'':28s}{'best':>10s}{'median':>10s}   images/s")
    print(f"{'plain PyTorch loop':28s}{best_p:10.1f}{med_p:10.1f}")
    print(f"{'Ray Train worker (1)':28s}{best_w:10.1f}{med_w:10.1f}")
    print(f"{'ratio Ray / plain':28s}{best_w / best_p:10.3f}{med_w / med_p:10.3f}   (target >= 0.95 median)"
          + ("" if load[0] < 1 else " NOT QUOTABLE"))
    ray.shutdown()


if __name__ == "__main__":
    main()
