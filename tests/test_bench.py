"""The benchmark: FLOP counting against a hand count, and a tiny end-to-end bench with its JSON and Markdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cifar_cnn.bench import run_bench, throughput


def test_flops_of_seed_cnn_by_hand() -> None:
    r = throughput("seed", steps=2, warmup=1, device="cpu", batch_size=8)
    conv1 = 2 * 3 * 9 * 16 * 32 * 32  # multiply-adds x 2, per output element
    conv2 = 2 * 16 * 9 * 32 * 16 * 16
    fc = 2 * 2048 * 512 + 2 * 512 * 10
    assert r["forward_gflop_per_img"] * 1e9 == pytest.approx(conv1 + conv2 + fc)
    assert r["train_img_per_s"] > 0 and r["infer_img_per_s"] > 0 and r["peak_memory_mb"] > 0


def test_bench_end_to_end(tmp_path: Path, official_dir: Path) -> None:
    out = tmp_path / "bench"
    result = run_bench(out, recipes=["seed"], seeds=[0], data=str(official_dir), device="cpu", threads=1,
                       log=lambda m: None)
    saved = json.loads((out / "bench.json").read_text())
    assert saved["runs"][0]["recipe"] == "seed" and 0 <= saved["runs"][0]["accuracy"] <= 1
    assert saved["runs"][0]["wall_s"] > 0 and result["throughput"][0]["model"] == "seed_cnn"
    md = (out / "bench.md").read_text()
    assert "| seed | seed_cnn |" in md and "| seed | 0 |" in md
