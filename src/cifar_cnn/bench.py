"""Benchmarks: throughput (train and inference img/s, achieved TFLOP/s, peak memory) of each recipe's model, and
time-to-accuracy of whole recipe runs, with the seed recipe measured side by side in the same invocation so the
ratio holds on a noisy machine. Writes bench.json and bench.md into the output folder.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .checkpoint import atomic_write_text
from .config import resolve_config
from .device import autocast, resolve_device, resolve_precision, set_threads, tune_allocator
from .engine import optimizer_for
from .errors import CifarCnnError
from .evaluate import tta_logits
from .models import create_model
from .recipes import RECIPES
from .runinfo import git_commit

TTA_VIEWS = {"none": 1, "flip": 2, "flip-translate": 6}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn`, counted by torch.utils.flop_counter (a multiply-add counts as 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(
    recipe: str,
    *,
    steps: int = 5,
    warmup: int = 1,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Median step time of training and of inference (with the recipe's TTA) on random data of the recipe's shape."""
    config = resolve_config(recipe, None, {"device": device, "precision": precision})
    dev = resolve_device(config.device)
    prec = resolve_precision(config.precision, dev)
    channels_last = config.channels_last and prec != "fp32"
    bs = batch_size or config.batch_size
    ebs = batch_size or config.eval_batch_size
    torch.manual_seed(0)
    model = create_model(config.model, num_classes=10, **config.model_args).to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = optimizer_for(model, config, steps_per_epoch=100)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(bs, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (bs,), device=dev)
    xe = torch.randn(ebs, 3, 32, 32, device=dev).contiguous(memory_format=fmt)

    def train_step() -> None:
        with autocast(dev, prec):
            out = model(x)
        F.cross_entropy(out.float(), y, reduction=config.loss_reduction).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer_step() -> None:
        with torch.inference_mode(), autocast(dev, prec):
            tta_logits(model, xe, config.tta)

    def timed(fn: Callable[[], None]) -> float:
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    train_flops = count_flops(train_step)
    train_s = timed(train_step)
    model.eval()
    infer_flops = count_flops(infer_step)
    infer_s = timed(infer_step)
    return {
        "recipe": recipe,
        "model": config.model,
        "precision": prec,
        "device": str(dev),
        "train_batch": bs,
        "train_img_per_s": bs / train_s,
        "train_tflops": train_flops / train_s / 1e12,
        "infer_batch": ebs,
        "tta": config.tta,
        "infer_img_per_s": ebs / infer_s,  # images per second with the recipe's TTA (each image = all its views)
        "infer_tflops": infer_flops / infer_s / 1e12,
        "forward_gflop_per_img": infer_flops / ebs / TTA_VIEWS[config.tta] / 1e9,
        "peak_memory_mb": (torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else peak_rss_mb(),
    }


def time_to_accuracy(recipe: str, seed: int, data: str, out: Path, extra: list[str]) -> dict[str, Any]:
    """Wall time of `cifar-cnn train` from launch until test_metrics.json is written (the decode cache is warm)."""
    run_dir = out / f"{recipe}-seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "cifar_cnn",
        "train",
        "--recipe",
        recipe,
        "--seed",
        str(seed),
        "--data",
        data,
        "--out",
        str(run_dir),
        "--overwrite",
        "--no-report",
        "--no-progress",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise CifarCnnError(f"bench: {recipe} seed {seed} failed: {proc.stderr.strip().splitlines()[-1:]}")
    test = json.loads((run_dir / "test_metrics.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    return {
        "recipe": recipe,
        "seed": seed,
        "wall_s": wall,
        "accuracy": test["accuracy"],
        "tta": test["tta"],
        "device": run["device"],
        "precision": run["precision"],
        "threads": run["threads"],
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": git_commit(),
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}"
        + (f", GPU {m['gpu']}" if m["gpu"] else "")
        + f"; commit {m['commit']}",
        "",
    ]
    if result["throughput"]:
        lines += [
            "| recipe | model | precision | train img/s | train TFLOP/s | inference img/s (TTA) | "
            "inference TFLOP/s | GFLOP/img | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["throughput"]:
            lines.append(
                f"| {r['recipe']} | {r['model']} | {r['precision']} | {r['train_img_per_s']:.0f} | "
                f"{r['train_tflops']:.3f} | {r['infer_img_per_s']:.0f} ({r['tta']}) | {r['infer_tflops']:.3f} | "
                f"{r['forward_gflop_per_img']:.3f} | {r['peak_memory_mb']:.0f} |"
            )
        lines.append("")
    if result["runs"]:
        lines += ["| recipe | seed | test accuracy | TTA | wall time (s) |", "|---|---|---|---|---|"]
        for r in result["runs"]:
            acc = f"{100 * r['accuracy']:.2f}%"
            lines.append(f"| {r['recipe']} | {r['seed']} | {acc} | {r['tta']} | {r['wall_s']:.0f} |")
        for ratio in result.get("ratios", []):
            lines.append(f"\n{ratio}")
    return "\n".join(lines) + "\n"


def run_bench(
    out: Path,
    *,
    recipes: list[str],
    seeds: list[int],
    data: str | None,
    throughput_only: bool = False,
    steps: int = 5,
    device: str = "auto",
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Throughput of every recipe's model, then (with `data`) each recipe run per seed; the seed recipe always runs
    first when timing, so its time and the others' come from the same invocation."""
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise CifarCnnError(f"bench: unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    tune_allocator()
    set_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine(), "throughput": [], "runs": [], "ratios": []}
    for recipe in recipes:
        r = throughput(recipe, steps=steps, device=device)
        log(
            f"throughput {recipe}: train {r['train_img_per_s']:.0f} img/s ({r['train_tflops']:.3f} TFLOP/s), "
            f"inference {r['infer_img_per_s']:.0f} img/s ({r['infer_tflops']:.3f} TFLOP/s)"
        )
        result["throughput"].append(r)
    if not throughput_only:
        if not data:
            raise CifarCnnError("bench: time-to-accuracy runs need --data (or pass --throughput-only)")
        extra = ["--device", device] + (["--threads", str(threads)] if threads else [])
        order = (["seed"] if "seed" in recipes else []) + [r for r in recipes if r != "seed"]
        for recipe in order:
            for seed in seeds:
                r = time_to_accuracy(recipe, seed, data, out, extra)
                log(f"{recipe} seed {seed}: {100 * r['accuracy']:.2f}% in {r['wall_s']:.0f} s")
                result["runs"].append(r)
        seed_runs = [r for r in result["runs"] if r["recipe"] == "seed"]
        for recipe in order[1:] if seed_runs else []:
            mine = [r for r in result["runs"] if r["recipe"] == recipe]
            base = statistics.median(r["wall_s"] for r in seed_runs)
            base_acc = statistics.mean(r["accuracy"] for r in seed_runs)
            ratio = base / statistics.median(r["wall_s"] for r in mine)
            reached = all(r["accuracy"] >= base_acc for r in mine)
            result["ratios"].append(
                f"whole seed run / whole {recipe} run = {ratio:.2f} (medians, same invocation); {recipe} "
                + (
                    f"also reaches the seed recipe's {100 * base_acc:.1f}%"
                    if reached
                    else f"does not reach the seed recipe's {100 * base_acc:.1f}%"
                )
            )
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "bench.md", markdown(result))
    return result
