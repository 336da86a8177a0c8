"""Export benchmark: ONNX export + verify time, and onnxruntime vs PyTorch inference throughput.

Weights do not change the cost of export or inference, so the model is a freshly initialised architecture
(default cifar_resnet18, 10 classes, 32 px, CIFAR-10 normalisation). Verification uses 64 seeded
random images (what ``bdsan export`` does without ``--holdout``). Throughput: ``--batches`` timed forward passes of
``--batch`` images after ``--warmup`` untimed ones, PyTorch float32 eval under ``torch.no_grad`` vs the exported
file through ``OnnxClassifier`` (normalisation included on both sides: [0,1] pixels in, logits out).

    python benchmarks/export_speed.py --device cpu --threads 2
    python benchmarks/export_speed.py --device cuda          # needs onnxruntime-gpu ('bdsan[gpu]')
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_model

from bdsan.allocator import keep_freed_memory
from bdsan.device import describe_device, resolve_device
from bdsan.exporters.onnx import export_onnx
from bdsan.io.archs import build_arch
from bdsan.io.models import from_module
from bdsan.io.onnx_runtime import OnnxClassifier
from bdsan.io.preprocess import Preprocessing


def images_per_second(run, pixels: torch.Tensor, batches: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        run(pixels)
    sync()
    start = time.perf_counter()
    for _ in range(batches):
        run(pixels)
    sync()
    return batches * len(pixels) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cifar_resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = from_module(build_arch(args.arch, 10), args.arch, 10, Preprocessing.preset("cifar10", args.size))
    result = {"arch": args.arch, "size": args.size, "device": describe_device(device), "cpu": cpu_model(),
              "threads": args.threads, "batch": args.batch, "torch": torch.__version__,
              "load_average_before": round(os.getloadavg()[0], 1)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        artifact = export_onnx(model, out, device=device, batch_size=args.batch)
        result["export_verify_s"] = round(time.perf_counter() - start, 2)
        result["export_s"], result["verify_s"] = artifact["timings_s"]["export"], artifact["timings_s"]["verify"]
        result["onnx_bytes"] = artifact["bytes"]
        result["parity"] = {k: artifact["parity"][k] for k in ("n", "max_abs_diff", "agreement", "provider")}

        pixels = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        pixels = pixels.to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        network = model.normalized().to(device).eval()
        with torch.no_grad():
            result["torch_img_s"] = round(images_per_second(network, pixels, args.batches, args.warmup, sync), 1)
        classifier = OnnxClassifier(out, device, batch_size=args.batch)
        result["onnxruntime_provider"] = classifier.provider
        result["onnxruntime_img_s"] = round(images_per_second(classifier, pixels, args.batches, args.warmup, sync), 1)
    result["load_average_after"] = round(os.getloadavg()[0], 1)
    result["onnxruntime_vs_torch"] = round(result["onnxruntime_img_s"] / result["torch_img_s"], 2)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    keep_freed_memory()  # as the CLI does (BENCHMARKS.md, "CPU memory allocator")
    main()
