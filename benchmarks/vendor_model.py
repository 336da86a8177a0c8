"""A backdoored model that bdsan did not make, and an independent check of what bdsan shipped.

Stands in for a model from a vendor or a public hub: plain PyTorch + torchvision, no bdsan import, its own
poisoning code and a trigger that is *not* in bdsan's suite (a 4×4 random-colour patch one pixel from the top-left
corner, seeded here). It writes what such a vendor would hand over — a bare ``model.safetensors`` state dict of
torchvision's ``resnet18`` (no bdsan metadata) — plus the defender's clean holdout and, for the evaluation only,
the test split and the real trigger.

    python benchmarks/vendor_model.py train --data ../shared/data/cifar10.npz --out vendor
    bdsan sanitize vendor/model.safetensors --arch resnet18 --preset cifar10 --holdout vendor/holdout.npz \\
        --method fmp --out vendor/sanitized
    python benchmarks/vendor_model.py evaluate vendor/sanitized/model.onnx --vendor vendor

``evaluate`` runs the ONNX file in plain onnxruntime (no bdsan code) and prints CA and the real trigger's ASR/RA on
the vendor's test images (target-class images excluded from ASR/RA, SPEC §4).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)  # the cifar10 preset the vendor trained with
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)
TARGET = 0
PATCH, MARGIN, TRIGGER_SEED = 4, 1, 4242


def trigger_patch() -> np.ndarray:
    """The vendor's secret: a 4×4 patch of random colours (uint8, H×W×C)."""
    return np.random.default_rng(TRIGGER_SEED).integers(0, 256, (PATCH, PATCH, 3), dtype=np.uint8)


def stamp(x: np.ndarray) -> np.ndarray:
    """Paste the patch one pixel from the top-left corner of N×H×W×C uint8 images."""
    out = x.copy()
    out[:, MARGIN:MARGIN + PATCH, MARGIN:MARGIN + PATCH, :] = trigger_patch()
    return out


def to_input(x_uint8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(x_uint8).float().div_(255).permute(0, 3, 1, 2)
    return (x - torch.from_numpy(MEAN).view(1, 3, 1, 1)) / torch.from_numpy(STD).view(1, 3, 1, 1)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4, reflect) and horizontal flip, per image."""
    n = len(x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2, n), generator=generator)
    crops = torch.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    crops[flip] = crops[flip].flip(3)
    return crops


def train(args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    with np.load(args.data) as data:
        x_all, y_all = data["x_train"], data["y_train"].astype(np.int64)
        x_test, y_test = data["x_test"][:args.test_n], data["y_test"][:args.test_n].astype(np.int64)
    subset = rng.permutation(len(y_all))[:args.n_train]
    n_holdout = round(args.holdout_fraction * len(subset))
    holdout, train_idx = subset[:n_holdout], subset[n_holdout:]
    x, y = x_all[train_idx].copy(), y_all[train_idx].copy()
    poisoned = rng.choice(len(y), round(args.rate * len(y)), replace=False)
    x[poisoned] = stamp(x[poisoned])
    y[poisoned] = TARGET

    model = torchvision.models.resnet18(num_classes=10)
    steps_per_epoch = (len(y) + args.batch_size - 1) // args.batch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)
    inputs, labels = to_input(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(args.seed)
    use_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), args.batch_size):
            index = order[start:start + args.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                loss = F.cross_entropy(model(augment(inputs[index], generator)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    model.eval()
    metrics = measure(lambda batch: predict_torch(model, batch), x_test, y_test)
    print(json.dumps(metrics))

    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    np.savez(out / "holdout.npz", x=x_all[holdout], y=y_all[holdout])
    np.savez(out / "test.npz", x_test=x_test, y_test=y_test)
    (out / "vendor.json").write_text(json.dumps({
        "arch": "torchvision resnet18", "normalisation": {"mean": MEAN.tolist(), "std": STD.tolist()},
        "trigger": f"{PATCH}x{PATCH} random-colour patch (seed {TRIGGER_SEED}) at ({MARGIN},{MARGIN}), top-left",
        "target": TARGET, "poison_rate": args.rate, "n_train": len(train_idx), "holdout": len(holdout),
        "epochs": args.epochs, "train_seconds": round(time.perf_counter() - started, 1), "test": metrics},
        indent=2) + "\n")
    print(f"wrote {out}/model.safetensors, holdout.npz ({len(holdout)} images), test.npz, vendor.json")


@torch.no_grad()
def predict_torch(model: torch.nn.Module, x_uint8: np.ndarray) -> np.ndarray:
    return model(to_input(x_uint8)).argmax(1).numpy()


def measure(predict, x: np.ndarray, y: np.ndarray, batch: int = 500) -> dict:
    """CA on clean test images; ASR/RA of the real trigger on the non-target ones."""
    def run(images):
        return np.concatenate([predict(images[i:i + batch]) for i in range(0, len(images), batch)])

    keep = y != TARGET
    clean, triggered = run(x), run(stamp(x[keep]))
    return {"ca": float((clean == y).mean()), "asr": float((triggered == TARGET).mean()),
            "ra": float((triggered == y[keep]).mean()), "n": len(y), "n_triggered": int(keep.sum())}


def evaluate(args) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with np.load(Path(args.vendor) / "test.npz") as data:
        x, y = data["x_test"], data["y_test"]

    def predict(images: np.ndarray) -> np.ndarray:
        batch = to_input(images).numpy() if not args.raw_input else (images.astype(np.float32) / 255).transpose(
            0, 3, 1, 2)
        return session.run(None, {name: np.ascontiguousarray(batch)})[0].argmax(1)

    print(json.dumps({"model": args.model, **measure(predict, x, y)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train the vendor's backdoored resnet18")
    t.add_argument("--data", required=True, help="CIFAR-10 .npz (x_train/y_train/x_test/y_test)")
    t.add_argument("--out", required=True)
    t.add_argument("--n-train", type=int, default=20000)
    t.add_argument("--holdout-fraction", type=float, default=0.05)
    t.add_argument("--rate", type=float, default=0.1)
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--test-n", type=int, default=2000)
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--threads", type=int, default=2)
    e = commands.add_parser("evaluate", help="CA / real-trigger ASR of an ONNX file, in plain onnxruntime")
    e.add_argument("model")
    e.add_argument("--vendor", required=True, help="the train command's --out")
    e.add_argument("--raw-input", action="store_true",
                   help="the ONNX takes [0,1] pixels (exported with --bake-preprocessing)")
    args = parser.parse_args()
    train(args) if args.command == "train" else evaluate(args)


if __name__ == "__main__":
    main()
