"""CIFAR-10 training speed before and after a change, side by side in one run.

The issue asks that in-memory CIFAR-10 training keeps its speed. This script checks out the commit before the change
as a git worktree (`--before-tree`, made when absent), then runs the same training command alternately with each
tree's `src/` first on PYTHONPATH (before, after, before, after, ...: `--rounds` of each), so that whatever else the
machine is doing slows both alike. The after tree's `src/` (this checkout, uncommitted changes included) is copied
once at the start, so edits made to the checkout during the run do not change what is measured. Each tree has its
own data home (the two write different decode-cache formats) and first runs the command once untimed, which decodes
the data and warms the caches. The figure compared is the training epoch's seconds from the run's metrics.csv
(without start-up, data loading and the final test), and the img/s it makes; medians over the rounds, and their ratio.

    python benchmarks/before_after.py                       # fast recipe, 1 epoch, 10,000 images, 3 rounds

The JSON (`--out`, default WORK/before_after.json) holds every run's figures, the commits and the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def ensure_worktree(tree: Path, commit: str) -> str:
    """A detached worktree of `commit` at `tree` (made when absent); its full commit id."""
    if not (tree / "src" / "cifar_cnn").is_dir():
        tree.parent.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "--detach", str(tree), commit)
    head = git("rev-parse", "HEAD", cwd=tree)
    if head != git("rev-parse", commit):
        raise SystemExit(
            f"{tree} is at {head[:10]}, not {commit}; remove it (git worktree remove {tree}) or pass "
            "another --before-tree"
        )
    return head


def tree_env(tree: Path, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["CIFAR_CNN_HOME"] = str(home)
    return env


def check_imports_from(tree: Path, env: dict[str, str]) -> None:
    found = subprocess.run(
        [sys.executable, "-c", "import cifar_cnn; print(cifar_cnn.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=env["CIFAR_CNN_HOME"],
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to((tree / "src").resolve()):
        raise SystemExit(f"with PYTHONPATH={tree / 'src'}, cifar_cnn is imported from {found}, not from that tree")


def train_once(name: str, tree: Path, home: Path, out: Path, data: str, train_args: list[str]) -> dict[str, Any]:
    """One training run with `tree`'s code: the epoch seconds, img/s and wall time."""
    env = tree_env(tree, home)
    argv = [
        sys.executable,
        "-m",
        "cifar_cnn",
        "train",
        "--data",
        data,
        "--out",
        str(out),
        "--overwrite",
        "--no-progress",
        "--no-report",
        *train_args,
    ]
    t0, cpu0, load = time.perf_counter(), _children_cpu(), os.getloadavg()[0]
    done = subprocess.run(argv, env=env, cwd=home, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if done.returncode != 0:
        raise SystemExit(f"{name}: {' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr}")
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    recorded = json.loads((out / "run.json").read_text())
    seconds = [float(r["seconds"]) for r in rows]
    return {
        "tree": name,
        "epoch_seconds": seconds,
        "wall_seconds": wall,
        "cpu_seconds": cpu,  # the whole command's user + system time: less sensitive to other work on the machine
        "load_average_at_start": round(load, 2),
        "train_images": int(recorded["images"]["train"]),  # per epoch, as the run recorded it
        "data_fingerprint": recorded["data_source"]["fingerprint"]["sha256"],
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    import torch

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before-commit", default="671d7ba", help="the commit before the change")
    p.add_argument("--before-tree", type=Path, default=Path("/tmp/work/before"), help="its worktree (made if absent)")
    p.add_argument("--after-tree", type=Path, default=ROOT, help="the tree with the change (default: this checkout)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the CIFAR-10 data both trees train on")
    p.add_argument("--work", type=Path, default=Path("/tmp/work/before-after"), help="data homes and run folders")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each tree, alternated")
    p.add_argument("--recipe", default="fast")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--subset", type=int, default=10_000, help="training images (0: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--train-arg", action="append", default=[], help="one more argument for train (repeatable)")
    p.add_argument(
        "--no-first-run", action="store_true", help="skip the untimed first runs (the data homes are decoded already)"
    )
    p.add_argument("--out", type=Path, default=None, help="the JSON (default: WORK/before_after.json)")
    args = p.parse_args(argv)

    def log(message: str) -> None:
        print(f"[before-after {time.strftime('%H:%M:%S')}] {message}", flush=True)

    t0 = time.perf_counter()
    before_commit = ensure_worktree(args.before_tree, args.before_commit)
    after_commit = git("rev-parse", "HEAD", cwd=args.after_tree)
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", cwd=args.after_tree))
    # the after tree's code, copied once: other work on the checkout during the run does not change what is timed
    after_copy = args.work / "after-tree"
    shutil.rmtree(after_copy, ignore_errors=True)
    shutil.copytree(args.after_tree / "src", after_copy / "src", ignore=shutil.ignore_patterns("__pycache__"))
    trees = {"before": args.before_tree, "after": after_copy}
    train_args = ["--recipe", args.recipe, "--epochs", str(args.epochs)]
    train_args += ["--subset", str(args.subset)] if args.subset else []
    train_args += ["--threads", str(args.threads)] if args.threads else []
    train_args += [a for extra in args.train_arg for a in extra.split()]
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    for name, tree in trees.items():
        home = args.work / f"home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        check_imports_from(tree, tree_env(tree, home))
        if args.no_first_run:
            continue
        log(f"{name} ({tree}): untimed first run (decodes {args.data} into {home})")
        first = train_once(name, tree, home, args.work / f"run-{name}", args.data, train_args)
        log(f"{name}: first run {first['wall_seconds']:.0f}s")
    for r in range(args.rounds):
        for name, tree in trees.items():
            run = train_once(name, tree, args.work / f"home-{name}", args.work / f"run-{name}", args.data, train_args)
            run["img_per_s"] = run["train_images"] * len(run["epoch_seconds"]) / sum(run["epoch_seconds"])
            runs[name].append(run)
            log(
                f"round {r + 1} {name}: epoch {sum(run['epoch_seconds']):.1f}s, {run['img_per_s']:.1f} img/s "
                f"(wall {run['wall_seconds']:.0f}s, CPU {run['cpu_seconds']:.0f}s, load {run['load_average_at_start']})"
            )
    median = {name: statistics.median(sum(r["epoch_seconds"]) for r in rs) for name, rs in runs.items()}
    ips = {name: statistics.median(r["img_per_s"] for r in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(r["cpu_seconds"] for r in rs) for name, rs in runs.items()}
    # each round's after against the before just ahead of it: robust to load that comes and goes between rounds
    paired = [a["img_per_s"] / b["img_per_s"] for b, a in zip(runs["before"], runs["after"])]
    result = {
        "benchmark": "before_after",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "train_args": train_args,
        "data": args.data,
        "before": {"commit": before_commit, "tree": str(args.before_tree)},
        "after": {
            "commit": after_commit,
            "tree": str(args.after_tree),
            "uncommitted_changes": dirty,
            "copied_to": str(after_copy),
        },
        "rounds": args.rounds,
        "train_images_per_epoch": runs["after"][0]["train_images"] if runs["after"] else None,
        "same_data": len({r["data_fingerprint"] for rs in runs.values() for r in rs}) == 1,
        "median_epoch_seconds": median,
        "median_img_per_s": ips,
        "ratio_after_to_before_img_per_s": ips["after"] / ips["before"] if runs["after"] else None,
        "paired_ratios": paired,
        "median_paired_ratio": statistics.median(paired) if paired else None,
        "median_command_cpu_seconds": cpu,
        "runs": runs,
        "machine": machine(),
        "total_seconds": time.perf_counter() - t0,
    }
    out = args.out or args.work / "before_after.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(
        f"before {median['before']:.1f}s/epoch ({ips['before']:.1f} img/s), after {median['after']:.1f}s/epoch "
        f"({ips['after']:.1f} img/s): after/before img/s = {result['ratio_after_to_before_img_per_s']:.3f}"
    )
    log(
        f"after/before img/s round by round: {', '.join(f'{v:.3f}' for v in paired)} "
        f"(median {result['median_paired_ratio']:.3f})"
    )
    log(f"wrote {out} ({result['total_seconds']:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
