"""FMP ranking speed: batched per-channel FGSM vs one channel at a time (ALGORITHMS §1), and FMP end to end.

    .venv/bin/python benchmarks/fmp_speed.py --arch small_resnet --rank-images 64 --reference-layers 3

Random weights (speed does not depend on training). The one-at-a-time reference is timed on the first
``--reference-layers`` conv layers only and extrapolated per channel to the whole network (said in the output).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from bdsan.allocator import keep_freed_memory
from bdsan.device import describe_device, resolve_device
from bdsan.io.archs import build_arch
from bdsan.io.data import Holdout
from bdsan.io.preprocess import Normalized, Preprocessing
from bdsan.sanitize import Context, get_method
from bdsan.sanitize.fmp import conv_bn_pairs, rank_channels, reference_ranking


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="small_resnet")
    parser.add_argument("--rank-images", type=int, default=64)
    parser.add_argument("--reference-layers", type=int, default=3)
    parser.add_argument("--chunk-images", type=int, default=1024)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--end-to-end-images", type=int, default=500, help="holdout size for the FMP run (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    net = Normalized(build_arch(args.arch, 10), Preprocessing.preset("cifar10")).to(device).eval()
    x = torch.rand(args.rank_images, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.rank_images,), device=device)
    order, _ = conv_bn_pairs(net, x[:1])
    modules = dict(net.named_modules())
    layers = [(name, modules[name]) for name in order]
    channels = sum(modules[name].out_channels for name in order)

    def timed(fn):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start_wall, time.process_time() - start_cpu

    batched_wall, batched_cpu = timed(lambda: rank_channels(
        net, layers, x, y, alpha=0.02, epsilon=0.06, generator=torch.Generator().manual_seed(0),
        chunk_images=args.chunk_images))
    ref_layers = layers[:args.reference_layers]
    ref_channels = sum(modules[name].out_channels for name, _ in ref_layers)
    ref_wall, _ = timed(lambda: reference_ranking(net, ref_layers, x, y, alpha=0.02, epsilon=0.06,
                                                        generator=torch.Generator().manual_seed(0)))
    # per-channel cost of the reference is a full forward + backward + forward, the same for every layer
    ref_full_wall = ref_wall / ref_channels * channels
    result = {"device": describe_device(device), "arch": args.arch, "rank_images": args.rank_images,
              "conv_layers": len(layers), "channels": channels, "threads": args.threads,
              "batched_s": round(batched_wall, 2), "batched_cpu_s": round(batched_cpu, 2),
              "reference_measured_layers": len(ref_layers), "reference_measured_channels": ref_channels,
              "reference_measured_s": round(ref_wall, 2),
              "reference_extrapolated_s": round(ref_full_wall, 1),
              "speedup": round(ref_full_wall / batched_wall, 1)}
    if args.end_to_end_images:
        n = args.end_to_end_images
        holdout = Holdout((torch.rand(n, 3, 32, 32) * 255).to(torch.uint8).to(device),
                          torch.arange(n, device=device) % 10, [str(i) for i in range(10)])
        fmp = get_method("fmp", rank_images=args.rank_images, chunk_images=args.chunk_images)
        end_wall, end_cpu = timed(lambda: fmp.run(net, holdout, Context(device=device, seed=0)))
        result.update({"end_to_end_fit_images": n, "end_to_end_s": round(end_wall, 1),
                       "end_to_end_cpu_s": round(end_cpu, 1)})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    keep_freed_memory()  # as the CLI does (BENCHMARKS.md, "CPU memory allocator")
    main()
