"""Audit throughput: images/s through ``bdsan.audit`` vs plain inference of the same model on the same device.

Weights do not change the cost, so the model is a freshly initialised architecture (default cifar_resnet18,
10 classes, 32 px, CIFAR-10 normalisation) and the holdout is ``--images`` seeded random uint8 images.
Plain inference = the same classifier (``classifier_for``: eval, bf16 autocast + channels_last on CUDA) over the
holdout in ``--batch`` batches, argmax kept — what a user's own evaluation loop would do. Audit images/s = images sent
through the model (holdout × (1 clean + number of triggers)) / audit wall time, so the ratio shows what trigger
stamping, bookkeeping and metrics cost on top of the forward passes. SPEC §6 goal: ratio ≥ 0.8.

    python benchmarks/audit_speed.py --device cpu --threads 2 --images 2000
    python benchmarks/audit_speed.py --device cuda --images 10000
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from machine import cpu_model

from bdsan.allocator import keep_freed_memory
from bdsan.detectors.audit import audit, classifier_for
from bdsan.detectors.triggers import DEFAULT_SUITE
from bdsan.device import describe_device, resolve_device
from bdsan.io.archs import build_arch
from bdsan.io.data import Holdout, to_float
from bdsan.io.models import from_module
from bdsan.io.preprocess import Preprocessing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_inference(classify, holdout: Holdout, batch_size: int, device: torch.device) -> float:
    """Seconds for one prediction pass over the holdout."""
    sync(device)
    start = time.perf_counter()
    predictions = torch.empty(len(holdout), dtype=torch.long, device=device)
    for begin in range(0, len(holdout), batch_size):
        x = to_float(holdout.x[begin:begin + batch_size])
        predictions[begin:begin + len(x)] = classify(x).argmax(dim=1)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cifar_resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="plain/audit measurements, interleaved; best kept")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    module = build_arch(args.arch, args.classes)
    model = from_module(module, args.arch, args.classes, Preprocessing.preset("cifar10"))
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8, generator=generator)
    y = torch.randint(0, args.classes, (args.images,), generator=generator)
    holdout = Holdout(x.to(device), y.to(device), [str(i) for i in range(args.classes)])
    classify = classifier_for(model, device)
    plain_inference(classify, holdout.subset(torch.arange(min(args.batch, args.images))), args.batch, device)  # warm-up

    forward_images = args.images * (1 + len(DEFAULT_SUITE))
    plain_rates, audit_rates = [], []
    for _ in range(args.repeats):
        plain_rates.append(args.images / plain_inference(classify, holdout, args.batch, device))
        sync(device)
        start = time.perf_counter()
        audit(model, holdout, batch_size=args.batch, device=device, classifier=classify)
        sync(device)
        audit_rates.append(forward_images / (time.perf_counter() - start))
    plain, audited = max(plain_rates), max(audit_rates)
    result = {"arch": args.arch, "size": args.size, "images": args.images, "batch": args.batch,
              "triggers": len(DEFAULT_SUITE), "forward_images_per_audit": forward_images,
              "device": describe_device(device), "cpu": cpu_model(), "threads": args.threads,
              "plain_images_per_s": round(plain, 1), "audit_images_per_s": round(audited, 1),
              "ratio": round(audited / plain, 3), "audit_seconds": round(forward_images / audited, 2),
              "torch": torch.__version__}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    keep_freed_memory()  # as the CLI does (BENCHMARKS.md, "CPU memory allocator")
    main()
