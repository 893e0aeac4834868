"""Fine-tuning speed at 224 px: microsoft/resnet-50's architecture trained and run by cifar-cnn on this machine.

The README's fine-tuning figures. This script

1. builds an `hf:` folder in a temporary directory: transformers' default `ResNetConfig()` (which is ResNet-50, the
   architecture of microsoft/resnet-50) with random weights, saved with `save_pretrained`, and microsoft/resnet-50's
   preprocessor_config.json (224 px, ImageNet mean/std); speed does not depend on the weights' values;
2. decodes the archive once into a data home (`cifar-cnn data --image-size 224`, reused by later runs of the script;
   the 32 px images stay 32 px there and batches are upscaled to 224 px on the tensor pipeline);
3. runs, `--repeats` times, the command a user fine-tunes with, in a subprocess:

       cifar-cnn train --model hf:FOLDER --data ARCHIVE --subset N --epochs 1 --image-size 224 --batch-size B
                       --val-split 0 --no-report

   and reads the epoch's seconds from its metrics.csv (training steps only: no start-up, data loading or test) as
   soon as it prints the epoch line; then it stops the command, whose next step, testing best.pt on all 10,000 test
   images at 224 px, would take far longer than the epoch (its time is estimated from the inference rate instead);
4. times inference as `cifar-cnn evaluate` computes it (`predict_logits`: normalize, upscale to 224 px, forward in
   eval mode), batch `--infer-batch-size`, on test images, with the weights the first run saved;
5. prints a summary and writes a JSON: training img/s and seconds per epoch (for the N images and extrapolated to the
   40,000 training images of CIFAR-10 with the default validation split, and to all 50,000), inference img/s, the
   precision and threads the runs used, torch and transformers versions, the CPU model. Medians over the repeats:
   the machine is shared and its load comes and goes (the load average is recorded before every run).

    python benchmarks/finetune_bench.py --subset 256 --batch-size 32 --repeats 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
IMAGE_SIZE = 224
CIFAR10_TRAIN = {"val_split_0.2": 40_000, "val_split_0": 50_000}  # training images per epoch on all of CIFAR-10
CIFAR10_TEST = 10_000
# microsoft/resnet-50's preprocessor_config.json (its image_processor_type key left out: cifar-cnn reads only these)
PREPROCESSOR = {
    "crop_pct": 0.875,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": {"shortest_edge": IMAGE_SIZE},
}
EPOCH_LINE = re.compile(r"^epoch 1/1\s")


def log(message: str) -> None:
    print(f"[finetune-bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_folder(folder: Path) -> int:
    """ResNet-50 (transformers' ResNetConfig defaults) with random weights, saved as microsoft/resnet-50 is laid out;
    returns its number of parameters."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    net = transformers.ResNetForImageClassification(transformers.ResNetConfig())
    net.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return sum(p.numel() for p in net.parameters())


def cli_env(home: Path) -> dict[str, str]:
    """This checkout's package first on the path, and the benchmark's own data home."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["CIFAR_CNN_HOME"] = str(home)
    return env


def decode(data: Path, home: Path) -> float:
    """`cifar-cnn data` once: decodes the archive into `home` (or finds it decoded there); its wall seconds."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "cifar_cnn", "data", "--data", str(data), "--image-size", str(IMAGE_SIZE)]
    done = subprocess.run(cmd, env=cli_env(home), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"cifar-cnn data failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def train_command(folder: Path, data: Path, out: Path, subset: int, batch: int, threads: int | None) -> list[str]:
    cmd = ["train", "--model", f"hf:{folder}", "--data", str(data), "--subset", str(subset), "--epochs", "1"]
    cmd += ["--image-size", str(IMAGE_SIZE), "--batch-size", str(batch), "--val-split", "0", "--no-report"]
    cmd += ["--out", str(out)]
    return cmd + (["--threads", str(threads)] if threads else [])


def timed_train(cmd: list[str], out: Path, home: Path, timeout: float) -> dict[str, Any]:
    """One `cifar-cnn train` in a subprocess, stopped once its epoch line is out (best.pt, last.pt and metrics.csv
    are written before it); the epoch's figures from metrics.csv and run.json."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_cnn", *cmd],
        env=cli_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    to_epoch_end = None
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            lines.append(line)
            if line.lstrip().startswith(("epoch 1/1 ", "decod", "data ")):  # progress, not the config's echo
                print(f"    {line}", flush=True)
            if EPOCH_LINE.match(line):
                to_epoch_end = time.perf_counter() - t0
                break
            if time.perf_counter() - t0 > timeout:
                break
    finally:
        proc.kill()  # the test of best.pt on 10,000 images at 224 px would follow; not measured here
        proc.wait()
    if to_epoch_end is None:
        tail = "\n".join(lines[-30:])
        raise SystemExit(f"cifar-cnn train ended or ran past {timeout:.0f}s without finishing its epoch:\n{tail}")
    with (out / "metrics.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    run = json.loads((out / "run.json").read_text())
    images = int(run["images"]["train"])
    seconds = float(row["seconds"])
    return {
        "epoch_seconds": seconds,
        "train_images": images,
        "img_per_s": images / seconds,
        "seconds_to_epoch_end": round(to_epoch_end, 1),  # start-up, data loading and model building included
        "train_loss": float(row["train_loss"]),
        "precision": run["precision"],
        "threads": run["threads"],
        "load_average_before": round(load, 2),
    }


def timed_inference(checkpoint: Path, data: Path, home: Path, batch: int, batches: int, repeats: int) -> dict:
    """img/s of the forward pass as `cifar-cnn evaluate` runs it (normalize, upscale, eval mode, no gradients), on
    `batches` batches of test images per repeat after one untimed batch; the median batch."""
    import torch

    from cifar_cnn import load_checkpoint, model_from_checkpoint
    from cifar_cnn.data import load_dataset
    from cifar_cnn.device import resolve_precision
    from cifar_cnn.evaluate import predict_logits

    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    precision = resolve_precision("auto", torch.device("cpu"))
    channels_last = precision != "fp32"  # as training and evaluation decide it
    if channels_last:
        model.to(memory_format=torch.channels_last)
    images = load_dataset(str(data), IMAGE_SIZE, home=home, log=lambda _m: None).test_images[: batch * (batches + 1)]
    seconds: list[float] = []
    for _ in range(repeats):
        for i in range(batches + 1):
            x = images[i * batch : (i + 1) * batch] if i else images[:batch]
            t0 = time.perf_counter()
            with torch.inference_mode():
                predict_logits(
                    model,
                    x,
                    tuple(ckpt["mean"]),
                    tuple(ckpt["std"]),
                    batch_size=batch,
                    precision=precision,
                    channels_last=channels_last,
                    size=IMAGE_SIZE,
                )
            if i:  # the first batch of each repeat warms oneDNN's kernels and the allocator
                seconds.append(time.perf_counter() - t0)
    median = statistics.median(seconds)
    return {
        "batch_size": batch,
        "batches_timed": len(seconds),
        "median_batch_seconds": median,
        "img_per_s": batch / median,
        "test_split_seconds_estimate": CIFAR10_TEST * median / batch,  # what train's final test would take
        "precision": precision,
        "threads": torch.get_num_threads(),
    }


def machine() -> dict[str, Any]:
    import torch
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    return {
        "cpu": names[0] if names else platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "avx512": "avx512f" in flags.split(),
        "memory_gib": round(mem / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the CIFAR-10 archive (default: the shared copy)")
    p.add_argument("--subset", type=int, default=256, help="training images per run (stratified)")
    p.add_argument("--batch-size", type=int, default=32, help="training images per step")
    p.add_argument("--repeats", type=int, default=2, help="training runs (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="--threads of the runs (default: torch's, as a user)")
    p.add_argument("--infer-batch-size", type=int, default=32, help="images per forward pass when timing inference")
    p.add_argument("--infer-batches", type=int, default=3, help="timed inference batches per repeat")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one training run may take to finish its epoch")
    p.add_argument("--work", type=Path, default=Path("/tmp/work/finetune-bench"), help="the data home lives here")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default: WORK/finetune_bench.json)")
    args = p.parse_args(argv)
    if not args.data.exists():
        raise SystemExit(f"--data {args.data}: no such file or folder")
    if args.repeats < 1 or args.subset < 10 or args.batch_size < 1:
        raise SystemExit("--repeats must be >= 1, --subset >= 10 (one image per class) and --batch-size >= 1")

    t_start = time.perf_counter()
    home = args.work / "home"
    home.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # inference in this process, as the runs
    decode_s = decode(args.data, home)
    log(f"data home {home}: archive decoded or found decoded in {decode_s:.0f}s (cifar-cnn data)")
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        folder = Path(tmp) / "resnet-50"
        parameters = build_folder(folder)
        log(f"{folder}: ResNet-50 (transformers ResNetConfig()), {parameters / 1e6:.1f}M parameters, random weights")
        runs = []
        for r in range(args.repeats):
            out = Path(tmp) / f"run{r}"
            cmd = train_command(folder, args.data, out, args.subset, args.batch_size, args.threads)
            log(f"run {r + 1}/{args.repeats}: cifar-cnn {' '.join(cmd)}")
            run = timed_train(cmd, out, home, args.timeout)
            runs.append(run)
            log(
                f"run {r + 1}: epoch {run['epoch_seconds']:.1f}s for {run['train_images']} images = "
                f"{run['img_per_s']:.2f} img/s ({run['precision']}, {run['threads']} threads, load average "
                f"{run['load_average_before']})"
            )
        inference = timed_inference(
            Path(tmp) / "run0" / "best.pt",
            args.data,
            home,
            args.infer_batch_size,
            args.infer_batches,
            args.repeats,
        )
        log(
            f"inference: {inference['img_per_s']:.1f} img/s (batch {inference['batch_size']}, median of "
            f"{inference['batches_timed']} batches)"
        )

    ips = statistics.median(run["img_per_s"] for run in runs)
    epoch_s = statistics.median(run["epoch_seconds"] for run in runs)
    command = ["cifar-cnn", *train_command(Path("FOLDER"), args.data, Path("OUT"), args.subset, args.batch_size, None)]
    result = {
        "benchmark": "finetune_bench",
        "model": "microsoft/resnet-50's architecture: transformers ResNetConfig() defaults, random weights",
        "parameters": parameters,
        "preprocessor_config": PREPROCESSOR,
        "data": str(args.data),
        "image_size": IMAGE_SIZE,
        "subset": args.subset,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "train_command": " ".join(command) + (f" --threads {args.threads}" if args.threads else ""),
        "train_img_per_s": ips,
        "epoch_seconds": epoch_s,
        "epoch_seconds_cifar10": {k: n / ips for k, n in CIFAR10_TRAIN.items()},
        "inference_img_per_s": inference["img_per_s"],
        "inference": inference,
        "precision": runs[0]["precision"],
        "threads": runs[0]["threads"],
        "decode_seconds": decode_s,
        "runs": runs,
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "total_seconds": time.perf_counter() - t_start,
    }
    out = args.out or args.work / "finetune_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(
        f"ResNet-50 at {IMAGE_SIZE} px, {result['precision']}, {result['threads']} threads: training "
        f"{ips:.2f} img/s (median of {args.repeats}), {epoch_s:.1f}s per epoch of {runs[0]['train_images']} images, "
        f"{result['epoch_seconds_cifar10']['val_split_0.2'] / 3600:.2f} h per epoch of CIFAR-10's 40,000; "
        f"inference {inference['img_per_s']:.1f} img/s (10,000 test images: "
        f"{inference['test_split_seconds_estimate'] / 60:.0f} min)"
    )
    log(f"wrote {out} ({result['total_seconds']:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
