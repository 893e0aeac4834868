"""Selective test-time augmentation: the extra TTA views only for the least confident images (issue 18's ablation).

For each CHECKPOINT this script evaluates the test split twice with the package's own evaluation
(`evaluate_checkpoint`): with the plain view only (tta none) and with the checkpoint's TTA (flip: 2 forward passes
per image, flip-translate: 6), timing both (`--repeats`, median). Selective TTA at fraction f keeps the plain logits of
the (1 - f) most confident images (largest softmax probability of the plain view) and takes the full TTA logits for
the f least confident, ranked over the whole split (an implementation ranking within each batch differs a little:
benchmarks/README.md). Its
forward passes per image are 1 + f * (views - 1); its time is estimated from the two measured times,
t_none + f * (t_tta - t_none).

    python benchmarks/selective_tta.py RUN1/best.pt RUN2/best.pt RUN3/best.pt --fractions 0,0.1,0.25,0.5,1

Prints a markdown table (accuracy per checkpoint and their mean, forward passes, estimated seconds) and, with --json
FILE, every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cifar_cnn.checkpoint import load_checkpoint  # noqa: E402
from cifar_cnn.choices import TTA_VIEWS  # noqa: E402
from cifar_cnn.evaluate import evaluate_checkpoint  # noqa: E402


def selective_accuracy(plain: torch.Tensor, full: torch.Tensor, labels: torch.Tensor, fraction: float) -> float:
    """Accuracy when the `fraction` least confident images (by the plain view's top softmax probability) take the
    full TTA logits and the rest their plain logits."""
    n = len(labels)
    k = round(fraction * n)
    confidence = plain.softmax(1).amax(1)
    chosen = torch.argsort(confidence, stable=True)[:k]
    logits = plain.clone()
    logits[chosen] = full[chosen]
    return float((logits.argmax(1) == labels).float().mean())


def timed_logits(checkpoint: str, data: str | None, tta: str, repeats: int) -> tuple[Any, float]:
    """The evaluation and its median seconds (the decode cache read, about 0.2 s, included in each)."""
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = evaluate_checkpoint(checkpoint, data, tta=tta, with_logits=True, log=lambda m: None)
        times.append(time.perf_counter() - t)
    return result, statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", default=None, help="default: the data each checkpoint trained on")
    p.add_argument("--fractions", default="0,0.1,0.25,0.5,1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    if not all(0.0 <= f <= 1.0 for f in fractions):
        p.error(f"--fractions {args.fractions}: every fraction must be in [0, 1]")
    rows: list[dict[str, Any]] = []
    for ckpt in args.checkpoints:
        mode = load_checkpoint(ckpt).get("tta", "none").removeprefix("selective-")
        plain, t_none = timed_logits(ckpt, args.data, "none", args.repeats)
        full, t_full = timed_logits(ckpt, args.data, mode, args.repeats)
        labels = torch.as_tensor(plain.labels)
        for f in fractions:
            rows.append(
                {
                    "checkpoint": ckpt,
                    "tta": mode,
                    "fraction": f,
                    "accuracy": selective_accuracy(plain.logits, full.logits, labels, f),
                    "passes_per_image": 1 + f * (TTA_VIEWS[mode] - 1),
                    "seconds_estimated": t_none + f * (t_full - t_none),
                    "seconds_none": t_none,
                    "seconds_tta": t_full,
                }
            )
    heads = " | ".join(f"ckpt {i + 1}" for i in range(len(args.checkpoints)))
    print(f"| TTA share | {heads} | mean | passes/img | s (est.) |")
    print("|---" * (len(args.checkpoints) + 4) + "|")
    for f in fractions:
        mine = [r for r in rows if r["fraction"] == f]
        accs = [100 * r["accuracy"] for r in mine]
        print(
            f"| {f:g} | "
            + " | ".join(f"{a:.2f}%" for a in accs)
            + f" | {statistics.mean(accs):.2f}% | {mine[0]['passes_per_image']:.2f} | "
            + f"{statistics.median(r['seconds_estimated'] for r in mine):.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
