"""Scanning and projecting a network that is not ZFNet (issue 12), measured side by side in one run:

(a) the top-9 scan of several layers (forward hooks, early stop, TopKTracker) vs a plain forward of
    the whole network over the same batches;
(b) projections/s of the generic deconvnet (zfcore.deconv_graph: autograd with every ReLU
    rectifying the signal) vs a plain forward + backward of the same items (the same autograd,
    no mode, no rectification): the price of the deconvnet rule.

Alternating repetitions, medians. Prints the machine's load average and refuses to call a ratio
quotable above 1.0. Runs unchanged on a GPU.

    .venv/bin/python benchmarks/any_cnn.py [--arch torchvision:resnet18] [--image-size 224]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from zfcore import architectures
from zfcore.deconv import deconvolve
from zfcore.network import as_network
from zfcore.topk import TopKTracker


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="torchvision:resnet18")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--layers", default="layer1,layer2,layer3,layer4")
    p.add_argument("--project-layer", default="layer3")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--project-items", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    arch = architectures.get(args.arch).at(args.image_size)
    model = arch.build(10).eval().to(device)
    network = as_network(model)
    layers = args.layers.split(",")
    size = args.image_size
    batches = [torch.randn(args.batch, 3, size, size, device=device) for _ in range(args.batches)]
    shapes = {n: network.layers(size)[n].shape for n in layers}

    @torch.no_grad()
    def plain() -> None:
        for x in batches:
            model(x)

    @torch.no_grad()
    def scan() -> None:
        tracker = TopKTracker(shapes, 9, device)
        for i, x in enumerate(batches):
            idx = torch.arange(i * len(x), (i + 1) * len(x), device=device)
            tracker.update(network.features(x, layers), idx)
        tracker.results()

    plain()
    scan()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "scan": []}
    for _ in range(args.repeats):
        times["plain"].append(timed(plain, device))
        times["scan"].append(timed(scan, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    n_img = args.batch * args.batches
    print(f"load average {load:.2f} (1 min); device={device} threads={args.threads} arch={args.arch} "
          f"{size}px images={n_img} repeats={args.repeats}")
    if load > 1.0:
        print("  the machine is busy (load > 1): the ratios below are not quotable")
    print(f"(a) plain forward (whole net)      {n_img / med['plain']:8.1f} images/s")
    print(f"    top-9 scan of {','.join(layers):<16} {n_img / med['scan']:8.1f} images/s")
    print(f"    ratio scan / plain forward     = {med['scan'] / med['plain']:.3f}  (target <= 1.10)")

    # (b) projections of n items: the generic deconvnet vs plain forward+backward.
    n = args.project_items
    layer = args.project_layer
    images = torch.randn(n, 3, size, size, device=device)
    channels = torch.randint(0, shapes.get(layer, network.layers(size)[layer].shape)[0], (n,))

    def deconvnet() -> None:
        deconvolve(network, images, layer, channels)

    def forward_backward() -> None:
        x = images.detach().requires_grad_(True)
        acts = network.features(x, [layer])[layer]
        signal = torch.zeros_like(acts)
        rows = torch.arange(n, device=device)
        flat = acts.detach()[rows, channels].flatten(1).argmax(1)
        h, w = acts.shape[-2:]
        signal[rows, channels, flat // w, flat % w] = 1.0
        torch.autograd.grad(acts, x, grad_outputs=signal)

    deconvnet()
    forward_backward()
    runs: dict[str, list[float]] = {"deconvnet": [], "fwd+bwd": []}
    for _ in range(args.repeats):
        runs["deconvnet"].append(timed(deconvnet, device))
        runs["fwd+bwd"].append(timed(forward_backward, device))
    d, fb = statistics.median(runs["deconvnet"]), statistics.median(runs["fwd+bwd"])
    print(f"(b) {layer} projections, {n} items (one image each):")
    print(f"    generic deconvnet              {n / d:8.1f} projections/s")
    print(f"    plain forward + backward       {n / fb:8.1f} items/s")
    print(f"    ratio deconvnet / fwd+bwd time = {d / fb:.3f}")


if __name__ == "__main__":
    main()
