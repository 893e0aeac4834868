"""Benchmarks: throughput (train and inference img/s, achieved TFLOP/s, peak memory) of each recipe's model, and
time-to-accuracy of whole recipe runs, with the seed recipe measured side by side in the same invocation so the
ratio holds on a noisy machine, and time-to-target (`--to-target`): test accuracy measured during training, the time
at which each recipe first reaches the seed recipe's final test accuracy. Writes bench.json and bench.md.
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
import yaml
from torch.utils.flop_counter import FlopCounterMode

from . import presets
from .atomic import atomic_write_text
from .choices import TTA_VIEWS
from .config import resolve_config
from .data import load_dataset
from .device import autocast, resolve_device, resolve_precision, set_threads, tune_allocator
from .engine import optimizer_for
from .engine import train as train_run
from .errors import CifarCnnError
from .evaluate import evaluate, evaluate_checkpoint, tta_logits
from .frontier import write_frontier
from .models import create_model
from .notebook_loop import notebook_loop
from .recipes import RECIPES
from .rundir import RunPaths, git_commit, read_run_json


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
    test = json.loads(RunPaths(run_dir).test_metrics.read_text())
    run = read_run_json(run_dir)
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


def time_to_target(
    recipe: str,
    seed: int,
    data: str,
    out: Path,
    *,
    target: float | None,
    probe_images: int = 5000,
    device: str = "auto",
    threads: int | None = None,
    home: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Test accuracy during one in-process training run of `recipe`, and the time it first reaches `target`.

    Every `probe_images` training images (rounded to whole steps) and at the end of every epoch, the weights that
    the run would save (the average, for a config with ema_decay) are evaluated on the test split with the recipe's
    TTA; the clock stops while they are. Time runs from the call of train(): reading the decode cache, model set-up,
    training and whatever the recipe does each epoch (validation, checkpoints), probes excluded; the interpreter and
    torch import before it are not counted. With `target` the run stops at the first probe that reaches it; without
    one it runs to the end and its final test accuracy (best.pt, evaluated after the clock stopped) is reported."""
    config = resolve_config(recipe, None, {**(overrides or {}), "seed": seed, "device": device})
    # the test images; the run reads the cache again, timed
    ds = load_dataset(data, presets.resolve_input_size(config), home=home, log=lambda m: None)
    mean, std, _ = presets.resolve_normalization(config, ds.classes, ds.train_images)
    every = max(1, round(probe_images / config.batch_size))
    curve: list[dict[str, float]] = []
    paused = 0.0
    reached: dict[str, float] | None = None

    def probe(model: torch.nn.Module, step: int, steps_per_epoch: int) -> None:
        nonlocal paused, reached
        if (step % every and step % steps_per_epoch) or reached is not None:
            return
        dev = next(model.parameters()).device
        if dev.type == "cuda":  # the steps queued so far belong to training, not to the probe
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        precision = resolve_precision(config.precision, dev)
        acc = evaluate(
            model,
            ds.test_images,
            ds.test_labels,
            ds.classes,
            mean=mean,
            std=std,
            batch_size=config.eval_batch_size,
            device=dev,
            precision=precision,
            channels_last=config.channels_last and precision != "fp32",
            tta=config.tta,
            size=presets.resolve_input_size(config),
        )["accuracy"]
        point = {"step": step, "images": step * config.batch_size, "seconds": t - started - paused, "accuracy": acc}
        curve.append(point)
        if target is not None and acc >= target:
            reached = point
        paused += time.perf_counter() - t

    run_dir = out / f"{recipe}-seed{seed}-to-target"
    started = time.perf_counter()
    train_run(
        config,
        data,
        run_dir,
        overwrite=True,
        threads=threads,
        home=home,
        log=lambda m: None,
        probe=probe,
        should_stop=lambda: reached is not None,
        evaluate_test=False,
    )
    train_s = time.perf_counter() - started - paused
    final = None
    if target is None:  # what `cifar-cnn train` writes to test_metrics.json, outside the clock
        final = evaluate_checkpoint(
            RunPaths(run_dir).best,
            data,
            device=device,
            batch_size=config.eval_batch_size,
            home=home,
            log=lambda m: None,
        )["accuracy"]
    return {
        "recipe": recipe,
        "seed": seed,
        "target": target,
        "reached": reached,
        "final_accuracy": final,
        "train_s": train_s,  # the whole run's training time (probes and final test excluded)
        "probe_every_steps": every,
        "tta": config.tta,
        "curve": curve,
    }


def to_target_bench(
    recipes: list[str],
    seeds: list[int],
    data: str,
    out: Path,
    *,
    target: float | None = None,
    probe_images: int = 5000,
    device: str = "auto",
    threads: int | None = None,
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The seed recipe first, trained to the end: its mean final test accuracy is the target (unless `target` is
    given) and its time to reach it the baseline; then every other recipe, with `overrides` (config values; the
    baseline stays as it is), until it reaches the target."""
    import torch._dynamo  # noqa: F401  (torch's optimizers import it on first use: ~1 s that only the first run pays)

    runs: list[dict[str, Any]] = []
    base_runs: list[dict[str, Any]] = []
    if "seed" in recipes:
        for seed in seeds:
            r = time_to_target(
                "seed", seed, data, out, target=None, probe_images=probe_images, device=device, threads=threads
            )
            base_runs.append(r)
        target = target if target is not None else statistics.mean(r["final_accuracy"] for r in base_runs)
        for r in base_runs:  # the first probe at the target; the seed recipe's best.pt epoch is one of them
            r["target"] = target
            r["reached"] = next((p for p in r["curve"] if p["accuracy"] >= target), None)
            log(f"to target seed seed {r['seed']}: final {100 * r['final_accuracy']:.2f}%, " + _reached(r))
        runs += base_runs
    if target is None:
        raise CifarCnnError("bench --to-target: include the seed recipe in --recipes, or give --target")
    for recipe in [r for r in recipes if r != "seed"]:
        for seed in seeds:
            r = time_to_target(
                recipe,
                seed,
                data,
                out,
                target=target,
                probe_images=probe_images,
                device=device,
                threads=threads,
                overrides=overrides,
            )
            log(f"to target {recipe} seed {seed}: " + _reached(r))
            runs.append(r)
    ratios = []
    # a seed run that never reaches the mean counts with its whole training time: a lower bound, in its favour
    base = [r["reached"]["seconds"] if r["reached"] else r["train_s"] for r in base_runs]
    for recipe in [r for r in recipes if r != "seed"]:
        mine = [r["reached"]["seconds"] for r in runs if r["recipe"] == recipe and r["reached"]]
        if base and mine and len(mine) == len(seeds):
            ratios.append(
                f"time to {100 * target:.2f}%: seed recipe / {recipe} = {statistics.median(base):.1f} s / "
                f"{statistics.median(mine):.1f} s = {statistics.median(base) / statistics.median(mine):.2f}x "
                "(medians, same invocation, probes excluded)"
            )
    return runs, ratios


def _reached(r: dict[str, Any]) -> str:
    p = r["reached"]
    if p is None:
        return f"did not reach {100 * r['target']:.2f}% in {r['train_s']:.1f} s"
    return f"{100 * p['accuracy']:.2f}% >= {100 * r['target']:.2f}% after {p['seconds']:.1f} s ({p['images']} images)"


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
        for r in result.get("notebook", []):
            lines.append(
                f"| the notebook's loop | {r['seed']} | {100 * r['accuracy']:.2f}% | none | {r['wall_s']:.1f} |"
            )
        for r in result["runs"]:
            acc = f"{100 * r['accuracy']:.2f}%"
            lines.append(f"| {r['recipe']} | {r['seed']} | {acc} | {r['tta']} | {r['wall_s']:.1f} |")
        for ratio in result.get("ratios", []):
            lines.append(f"\n{ratio}")
        lines.append("")
    if result.get("to_target"):
        lines += [
            "| recipe | seed | target | reached | after (s) | images | probes every (steps) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["to_target"]:
            p = r["reached"]
            lines.append(
                f"| {r['recipe']} | {r['seed']} | {100 * r['target']:.2f}% | "
                + (f"{100 * p['accuracy']:.2f}% | {p['seconds']:.1f} | {p['images']}" if p else "no | - | -")
                + f" | {r['probe_every_steps']} |"
            )
        for ratio in result.get("to_target_ratios", []):
            lines.append(f"\n{ratio}")
    return "\n".join(lines) + "\n"


def run_bench(
    out: Path,
    *,
    recipes: list[str],
    seeds: list[int],
    data: str | None,
    throughput_only: bool = False,
    to_target: bool = False,
    target: float | None = None,
    probe_images: int = 5000,
    overrides: dict[str, Any] | None = None,
    steps: int = 5,
    device: str = "auto",
    threads: int | None = None,
    notebook: bool = False,
    pareto: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Throughput of every recipe's model, then (with `data`) each recipe run per seed; the seed recipe always runs
    first when timing, so its time and the others' come from the same invocation. `to_target`: instead of whole
    runs, the time each recipe takes to reach the seed recipe's final test accuracy (see to_target_bench).
    `overrides` (config values, e.g. {"ema_decay": 0.95}) apply to every recipe but the seed baseline. `notebook`:
    the teaching notebook's own loop runs first, once per seed, and every recipe is compared with it. `pareto` (with
    `notebook`): accuracy against wall time of every run, the frontier marked, in pareto.md, pareto.json and
    pareto.svg (cifar_cnn.frontier)."""
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise CifarCnnError(f"bench: unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    if target is not None and not 0 < target <= 1:
        raise CifarCnnError(f"bench: --target {target} is not an accuracy; give a fraction in (0, 1], e.g. 0.67")
    if probe_images < 1:
        raise CifarCnnError(f"bench: --probe-images {probe_images} must be at least 1")
    if not throughput_only and not data:
        raise CifarCnnError("bench: time-to-accuracy runs need --data (or pass --throughput-only)")
    if (notebook or pareto) and (throughput_only or to_target):
        raise CifarCnnError("bench: --notebook and --pareto time whole runs; drop --throughput-only and --to-target")
    overrides = dict(overrides or {})
    for recipe in recipes:
        if recipe != "seed":
            resolve_config(recipe, None, overrides)  # unknown keys and bad values fail now, not after the baseline
    if to_target and target is None and "seed" not in recipes:
        raise CifarCnnError("bench --to-target: include the seed recipe in --recipes, or give --target")
    tune_allocator()
    set_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "machine": machine(),
        "overrides": overrides,
        "throughput": [],
        "runs": [],
        "ratios": [],
    }
    for recipe in recipes:
        r = throughput(recipe, steps=steps, device=device)
        log(
            f"throughput {recipe}: train {r['train_img_per_s']:.0f} img/s ({r['train_tflops']:.3f} TFLOP/s), "
            f"inference {r['infer_img_per_s']:.0f} img/s ({r['infer_tflops']:.3f} TFLOP/s)"
        )
        result["throughput"].append(r)
    if to_target and not throughput_only:
        result["to_target"], result["to_target_ratios"] = to_target_bench(
            recipes,
            seeds,
            data,
            out,
            target=target,
            probe_images=probe_images,
            device=device,
            threads=threads,
            overrides=overrides,
            log=log,
        )
    elif not throughput_only:
        if notebook:
            result["notebook"] = notebook_runs(seeds, data, out, device, log)
        result["runs"], order = whole_runs(
            recipes, seeds, data, out, overrides=overrides, device=device, threads=threads, log=log
        )
        result["ratios"] = seed_ratios(result["runs"], order)
        if notebook:
            result["ratios"] += notebook_ratios(result["notebook"], result["runs"], order)
    if pareto and result["runs"]:
        result["pareto"] = write_frontier(out, result.get("notebook", []), result["runs"], result["machine"])
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "bench.md", markdown(result))
    return result


def whole_runs(
    recipes: list[str],
    seeds: list[int],
    data: str,
    out: Path,
    *,
    overrides: dict[str, Any],
    device: str,
    threads: int | None,
    log: Callable[[str], None],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each recipe per seed as a `cifar-cnn train` process (time_to_accuracy), the seed recipe first; `overrides`
    reach every recipe but the seed baseline through a config file. Returns the runs and the recipes in run order."""
    extra = ["--device", device] + (["--threads", str(threads)] if threads else [])
    if overrides:  # a config file sits between the recipe and the command line
        atomic_write_text(out / "overrides.yaml", yaml.safe_dump(overrides))
    order = (["seed"] if "seed" in recipes else []) + [r for r in recipes if r != "seed"]
    runs = []
    for recipe in order:
        for seed in seeds:
            more = ["--config", str(out / "overrides.yaml")] if overrides and recipe != "seed" else []
            r = time_to_accuracy(recipe, seed, data, out, extra + more)
            log(f"{recipe} seed {seed}: {100 * r['accuracy']:.2f}% in {r['wall_s']:.0f} s")
            runs.append(r)
    return runs, order


def seed_ratios(runs: list[dict[str, Any]], order: list[str]) -> list[str]:
    """For each recipe after the seed recipe: the seed recipe's median wall time over its, and whether it reached the
    seed recipe's mean test accuracy on every seed."""
    seed_runs = [r for r in runs if r["recipe"] == "seed"]
    lines = []
    for recipe in order[1:] if seed_runs else []:
        mine = [r for r in runs if r["recipe"] == recipe]
        base = statistics.median(r["wall_s"] for r in seed_runs)
        base_acc = statistics.mean(r["accuracy"] for r in seed_runs)
        ratio = base / statistics.median(r["wall_s"] for r in mine)
        reached = all(r["accuracy"] >= base_acc for r in mine)
        lines.append(
            f"whole seed run / whole {recipe} run = {ratio:.2f} (medians, same invocation); {recipe} "
            + (
                f"also reaches the seed recipe's {100 * base_acc:.1f}%"
                if reached
                else f"does not reach the seed recipe's {100 * base_acc:.1f}%"
            )
        )
    return lines


def notebook_runs(
    seeds: list[int], data: str, out: Path, device: str, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """The teaching notebook's own loop (cifar_cnn.notebook_loop) once per seed, before any recipe runs. It runs in
    this process, timed from its call: the ~1.5 s of interpreter and torch start-up that every recipe's time
    includes (a `cifar-cnn train` process each, timed from launch) are not counted against it."""
    runs = []
    for seed in seeds:
        r = notebook_loop(data, out / f"notebook-seed{seed}", seed=seed, device=device, log=lambda m: None)
        log(f"notebook loop seed {seed}: {100 * r['accuracy']:.2f}% in {r['wall_s']:.0f} s")
        runs.append(r)
    return runs


def notebook_ratios(base: list[dict[str, Any]], runs: list[dict[str, Any]], recipes: list[str]) -> list[str]:
    """For each recipe: the notebook loop's median wall time over the recipe's, and whether the recipe reached the
    notebook loop's test accuracy on every seed (seed by seed: the same seed's loop)."""
    lines = []
    base_s = statistics.median(r["wall_s"] for r in base)
    base_acc = {r["seed"]: r["accuracy"] for r in base}
    for recipe in recipes:
        mine = [r for r in runs if r["recipe"] == recipe]
        if not mine:
            continue
        ratio = base_s / statistics.median(r["wall_s"] for r in mine)
        below = [r["seed"] for r in mine if r["accuracy"] < base_acc.get(r["seed"], 0.0)]
        lines.append(
            f"notebook loop / {recipe} = {base_s:.1f} s / {statistics.median(r['wall_s'] for r in mine):.1f} s = "
            f"{ratio:.1f}x (median wall times, same invocation); {recipe} "
            + (
                "reaches the notebook loop's test accuracy on every seed"
                if not below
                else f"is below the notebook loop's test accuracy on seed(s) {', '.join(map(str, below))}"
            )
        )
    return lines
