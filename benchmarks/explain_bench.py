"""How far a checkpoint's explanations and probabilities can be trusted: the README's figures for the `fast` recipe.

For a trained checkpoint and its data this script measures, on a seed-fixed sample of `--images` test images:

1. the deletion test of every method (cifar_cnn.explain.deletion_test): the mean fall of predict's probability for
   the predicted class when the 20% of pixels the map ranks highest are set to grey (128), against greying a random
   20% drawn at the map's own resolution ("margin": single pixels for the gradient methods, Grad-CAM's h x w regions
   for Grad-CAM), against random single pixels whatever the map ("margin vs pixels"), against one centre-weighted
   map used for every image ("margin vs centre") and against the next image's map ("margin vs another image's
   map"), in points;
2. the model-randomization check (cifar_cnn.explain.randomization_check) on the first `--random-images` of them:
   Spearman's rank correlation between the maps of the model and of a copy with re-initialized weights;
3. the seconds each method takes per image on this machine;
4. the calibration figures of the checkpoint on the whole test split (from cifar_cnn.evaluate): ECE and NLL with its
   temperature and at temperature 1, and the accuracy.

    python benchmarks/explain_bench.py runs/fast/best.pt --data ../shared/data/cifar10-jpg.tar.gz --images 1000

It prints a markdown table and writes the figures as JSON (`--json FILE`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cifar_cnn.data import load_dataset
from cifar_cnn.evaluate import evaluate_checkpoint
from cifar_cnn.explain import DeletionBaselines, Explainer, deletion_test, randomization_check

METHODS = ("gradcam", "saliency", "integrated-gradients")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def calibration_figures(checkpoint: str, data: str) -> dict:
    """Accuracy, temperature, ECE and NLL (with and without the temperature) on the whole test split."""
    m = evaluate_checkpoint(checkpoint, data, split="test", precision="fp32", log=lambda m: None).metrics
    keys = ("accuracy", "temperature", "ece", "nll", "uncalibrated", "mean_confidence")
    return {k: m[k] for k in keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", type=int, default=1000, help="test images for the deletion test")
    parser.add_argument("--random-images", type=int, default=200, help="test images for the randomization check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--block", type=int, default=0, help="also a block-level test, deleting squares of this side (0: none)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", default=None, metavar="FILE")
    parser.add_argument("--no-calibration", action="store_true", help="skip step 4 (a TTA pass over the test split)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    explainer = Explainer.from_checkpoint(args.checkpoint, threads=args.threads)
    ds = load_dataset(args.data, explainer.size, log=lambda m: None)
    pick = np.sort(np.random.default_rng(args.seed).choice(len(ds.test_labels), args.images, replace=False))
    images = np.asarray(ds.test_images[pick])

    rows = []
    baselines = DeletionBaselines(explainer.predictor, images)  # measured once for all methods
    for method in METHODS:
        started = time.perf_counter()
        maps = explainer.maps(images, method)
        seconds = time.perf_counter() - started
        grain = explainer.resolution(method)
        common = dict(seed=args.seed, maps=maps, resolution=grain, baselines=baselines)
        deletion = deletion_test(explainer, images, method, **common)
        blocks = deletion_test(explainer, images, method, block=args.block, **common) if args.block > 1 else None
        randomized = randomization_check(explainer, images[: args.random_images], method, seed=args.seed)
        rows.append(
            {**deletion, "blocks": blocks, "ms_per_image": 1000 * seconds / len(images), "randomization": randomized}
        )
        print(f"{method}: margin {deletion['margin']:.1f} points ({seconds:.1f} s)", file=sys.stderr, flush=True)

    calibration = None if args.no_calibration else calibration_figures(args.checkpoint, args.data)
    result = {
        "checkpoint": args.checkpoint,
        "images": args.images,
        "random_images": args.random_images,
        "methods": rows,
        "calibration": calibration,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} threads",
        "torch": torch.__version__,
    }
    print(
        "| method | greying its top 20% | its surrogate's top 20% | a random 20% at its grain (grain) | random pixels "
        "| the centre map | another image's map | margin | vs grain | vs pixels | vs centre | vs another image | "
        "Spearman vs random weights | ms/image |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        grain = "x".join(str(v) for v in r["resolution"])
        print(
            f"| {r['method']} | {r['drop']:.1f} | {r['surrogate_drop']:.1f} | {r['random_drop']:.1f} ({grain}) | "
            f"{r['pixel_random_drop']:.1f} | {r['centre_drop']:.1f} | {r['other_image_drop']:.1f} | "
            f"**{r['margin']:.1f}** | {r['margin_vs_grain']:.1f} | {r['margin_vs_pixels']:.1f} | "
            f"{r['margin_vs_centre']:.1f} | {r['margin_vs_other_image']:.1f} | "
            f"{r['randomization']['spearman_mean']:.2f} | {r['ms_per_image']:.1f} |"
        )
    if calibration is not None:
        u = calibration["uncalibrated"]
        print(
            f"\ntest accuracy {100 * calibration['accuracy']:.2f}%, temperature {calibration['temperature']:.3f}: "
            f"ECE {100 * u['ece']:.2f}% -> {100 * calibration['ece']:.2f}%, NLL {u['nll']:.4f} -> "
            f"{calibration['nll']:.4f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
