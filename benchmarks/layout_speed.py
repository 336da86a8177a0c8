"""Memory layout: NCHW vs channels_last for the passes bdsan repeats most, on this machine's CPU (or --device).

Per architecture: the scan's pass (forward + gradient w.r.t. the input through a frozen model, as ``bdsan scan``
and FMP's ranking run it) and a training step (forward + backward + SGD step, BatchNorm in train mode, as
fine-tuning and the harness run it), each timed over ``--repeats`` passes after one warm-up, plus the largest
difference between the two layouts' logits. Only the weights change layout (``bdsan.device.channels_last``);
convolutions follow them.

    python benchmarks/layout_speed.py --archs tiny_cnn small_resnet --batch 256 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from bdsan.allocator import keep_freed_memory
from bdsan.device import channels_last, resolve_device
from bdsan.io.archs import build_arch


def input_gradient_seconds(net: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    for p in net.parameters():
        p.requires_grad_(False)
    delta = torch.zeros_like(x, requires_grad=True)
    out = net(x + delta)
    out.logsumexp(1).sum().backward()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        out = net(x + delta)
        out.logsumexp(1).sum().backward()
    return (time.perf_counter() - started) / repeats, out.detach()


def train_step_seconds(net: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    net = copy.deepcopy(net).train()
    for p in net.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    started = None
    for step in range(repeats + 1):
        if step == 1:
            started = time.perf_counter()
        optimizer.zero_grad()
        net(x).logsumexp(1).sum().backward()
        optimizer.step()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["tiny_cnn", "small_resnet"])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print("| arch | pass | NCHW s | channels_last s | speed-up | max logit diff |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs:
        torch.manual_seed(0)
        net = build_arch(arch, num_classes=args.classes).to(device).eval()
        x = torch.rand(args.batch, 3, 32, 32, device=device)
        nchw, logits = input_gradient_seconds(net, x, args.repeats)
        with channels_last(net):
            nhwc, logits_cl = input_gradient_seconds(net, x, args.repeats)
            train_cl = train_step_seconds(net, x, args.repeats)
        train = train_step_seconds(net, x, args.repeats)
        diff = float((logits - logits_cl).abs().max())
        print(f"| {arch} | input gradient | {nchw:.3f} | {nhwc:.3f} | {nchw / nhwc:.2f}× | {diff:.1e} |")
        print(f"| {arch} | training step | {train:.3f} | {train_cl:.3f} | {train / train_cl:.2f}× | |")


if __name__ == "__main__":
    keep_freed_memory()  # as the CLI does (BENCHMARKS.md, "CPU memory allocator")
    main()
