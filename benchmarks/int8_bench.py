"""int8 ONNX against float ONNX on a CPU: images per second in onnxruntime and top-1 accuracy, in one run.

The issue's target (issue 15): `cifar-cnn export --format onnx --int8` serves >= 1.5x the float model's img/s for the
quick and fast recipes' models (aim 2x for fast) at <= 0.5 points of accuracy lost. This script

1. exports CHECKPOINT with `export_checkpoint` into a temporary folder: float ONNX, and int8 in each `--formats`
   (QDQ, QOperator), the gate wide open so every model is measured;
2. takes `--images` test images of `--data` (default: the data the checkpoint trained on), spread over the split
   as the export's gate samples them (`gate_sample`), normalized as the exported models take them;
3. makes one onnxruntime session per model, with the default graph optimizations and `--threads` intra-op threads,
   and runs each over the images in batches of `--batch-size`: `--warmup` untimed passes, then `--repeats` timed
   passes, the models taking turns in every repeat (load that comes and goes slows them alike);
4. reports each model's img/s (images / median pass seconds), its speed-up over float and its top-1 accuracy on those
   images: a markdown row per int8 model, and with `--json FILE` every figure with the machine.

    python benchmarks/int8_bench.py /work/runs/quick/best.pt --data /work/shared/data/cifar10-jpg.tar.gz
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("QDQ", "QOperator", "QDQ-float-GELU")  # the last: QDQ with its GELUs left in float, to compare


def export_models(
    checkpoint: Path, data: str | None, formats: list[str], work: Path, args: argparse.Namespace
) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The float export and one int8 export per quantization format, each with its OUT.json report."""
    from cifar_cnn.export import export_checkpoint

    common = dict(data=data, num_images=200, threads=args.threads, log=lambda m: None)
    models = {"float": (work / "float.onnx", export_checkpoint(checkpoint, "onnx", work / "float.onnx", **common))}
    for fmt in formats:
        path = work / f"int8-{fmt}.onnx"
        report = export_checkpoint(
            checkpoint,
            "onnx",
            path,
            int8=True,
            quant_format=fmt.split("-")[0],
            gelu_lookups=not fmt.endswith("float-GELU"),
            calibration_count=args.quantization_images,
            gate_images=args.images,
            max_accuracy_drop=100.0,  # measure every model; the export's own gate is what users get
            **common,
        )
        models[f"int8 {fmt}"] = (path, report)
    return models


def run_pass(session: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits of every image, `batch_size` at a time."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def time_models(
    paths: dict[str, Path], x: np.ndarray, batch_size: int, threads: int, warmup: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Seconds of each timed pass per model (models alternated within every repeat), and each model's logits."""
    from cifar_cnn.export import onnx_session

    sessions = {name: onnx_session(path, threads) for name, path in paths.items()}
    logits = {name: run_pass(s, x, batch_size) for name, s in sessions.items()}
    for _ in range(warmup - 1):
        for s in sessions.values():
            run_pass(s, x, batch_size)
    seconds: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            run_pass(s, x, batch_size)
            seconds[name].append(time.perf_counter() - t0)
    return seconds, logits


def machine() -> dict[str, Any]:
    import onnxruntime

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def markdown(result: dict[str, Any]) -> str:
    """A header and one row per int8 model."""
    rows = [
        "| model | images | batch | threads | float img/s | int8 img/s | speed-up | float top-1 | int8 top-1 | drop |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = result["models"]["float"]
    for name, m in result["models"].items():
        if name == "float":
            continue
        rows.append(
            f"| {result['model']} {name} | {result['images']} | {result['batch_size']} | {result['threads']} | "
            f"{base['img_per_s']:.0f} | {m['img_per_s']:.0f} | {m['speedup']:.2f}x | {100 * base['accuracy']:.2f}% | "
            f"{100 * m['accuracy']:.2f}% | {100 * (base['accuracy'] - m['accuracy']):.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a .pt file written by train")
    p.add_argument("--data", default=None, help="test images (default: the data the checkpoint trained on)")
    p.add_argument(
        "--formats", default="QDQ,QDQ-float-GELU,QOperator", help=f"int8 formats to measure, from {', '.join(FORMATS)}"
    )
    p.add_argument("--images", type=int, default=2000, help="test images timed and scored")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes over the images")
    p.add_argument("--repeats", type=int, default=5, help="timed passes over the images (median)")
    p.add_argument("--quantization-images", type=int, default=512)
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every figure here")
    args = p.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or any(f not in FORMATS for f in formats):
        p.error(f"--formats {args.formats!r}: choose from {', '.join(FORMATS)}")

    def log(message: str) -> None:
        print(f"[int8-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    from cifar_cnn.data import load_dataset
    from cifar_cnn.export import gate_sample, model_inputs

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as folder:
        log(f"exporting {args.checkpoint}: float and int8 ({', '.join(formats)})")
        models = export_models(args.checkpoint, args.data, formats, Path(folder), args)
        meta = models["float"][1]
        ds = load_dataset(meta["parity"]["data"], int(meta["input_size"]), threads=args.threads, log=lambda m: None)
        pick = gate_sample(len(ds.test_labels), args.images)  # the images the export's gate scores
        n = len(pick)
        x = model_inputs(np.asarray(ds.test_images[pick]), meta).numpy()
        labels = ds.test_labels[pick]
        log(f"timing {len(models)} models on {n} test images, batch {args.batch_size}, {args.threads} threads")
        paths = {name: path for name, (path, _) in models.items()}
        seconds, logits = time_models(paths, x, args.batch_size, args.threads, max(1, args.warmup), args.repeats)
        sizes = {name: path.stat().st_size for name, path in paths.items()}
    figures: dict[str, Any] = {}
    for name, (_, report) in models.items():
        figures[name] = {
            "median_seconds": statistics.median(seconds[name]),
            "seconds": seconds[name],
            "img_per_s": n / statistics.median(seconds[name]),
            "speedup": statistics.median(seconds["float"]) / statistics.median(seconds[name]),
            "accuracy": float((logits[name].argmax(1) == labels).mean()),
            "agreement_with_float": float((logits[name].argmax(1) == logits["float"].argmax(1)).mean()),
            "file_bytes": sizes[name],
            "quantization": report.get("quantization"),
        }
    result = {
        "benchmark": "int8_bench",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "checkpoint": str(args.checkpoint),
        "model": meta["model"],
        "data": meta["parity"]["data"],
        "images": n,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "graph_optimizations": "onnxruntime default (ORT_ENABLE_ALL)",
        "models": figures,
        "machine": machine(),
        "total_seconds": time.perf_counter() - t0,
    }
    print(markdown(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
