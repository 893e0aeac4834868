"""benchmarks/memory_bench.py and benchmarks/before_after.py end to end, each on tiny data for a few steps: the JSON
they write has its fields, and the figures are sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

BENCHMARKS = ROOT / "benchmarks"


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize("method", ["auto", "fadvise"])
def test_memory_bench_tiny(tmp_path: Path, method: str) -> None:
    out = tmp_path / "memory.json"
    run_script(
        str(BENCHMARKS / "memory_bench.py"),
        *("--method", method),
        *("--limit-mib", "1024", "--data-factor", "0.001", "--image-size", "32", "--test-images", "50"),
        *("--batch-size", "16", "--steps", "4", "--warmup", "1", "--rounds", "1", "--loader-steps", "3"),
        *("--model", "resnet18", "--model-args", '{"width": 2}', "--threads", "1"),
        *("--work", str(tmp_path / "work"), "--out", str(out)),
    )
    r = json.loads(out.read_text())
    assert r["method"] in (("cgroup2", "cgroup1", "fadvise") if method == "auto" else (method,)) and r["method_note"]
    n = r["data"]["train_images"]
    assert n == 350 and r["data"]["decoded_train_bytes"] == n * 3 * 32 * 32  # ceil(0.001 * 2**30 / 3072 / 10) * 10
    assert r["data"]["store_bytes"] == (n + 50) * 3 * 32 * 32
    assert r["memory_subset_images"] == 35
    for run in r["disk_runs"] + r["memory_runs"]:
        assert run["steps_timed"] == 3 and run["img_per_s"] > 0 and run["seconds"] > 0
        assert 0 <= run["data_wait_fraction"] < 1 and run["rss_anon_peak_bytes"] > 10 * 2**20
    assert [run["loader"] for run in r["disk_runs"]] == ["StreamLoader"]
    assert [run["loader"] for run in r["memory_runs"]] == ["TensorLoader"]
    assert r["memory_runs"][0]["train_images"] == 35 and r["disk_runs"][0]["train_images"] == n
    assert r["ratio"] == pytest.approx(r["disk_img_per_s"] / r["memory_img_per_s"])
    assert r["loader_only"]["img_per_s"] > 0 and r["loader_only"]["steps_timed"] == 2
    assert r["machine"]["cores"] >= 1 and r["machine"]["torch"]
    if r["method"] != "fadvise":  # the child ran in the cgroup, and the cgroup is gone
        assert 0 < r["disk_cgroup_peak_bytes"] <= r["limit_bytes"]
        assert not Path(r["cgroup_folder"]).exists()


def _has_commit(commit: str) -> bool:
    done = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
    return done.returncode == 0


@pytest.mark.slow
def test_before_after_tiny(tmp_path: Path, official_dir: Path) -> None:
    commit = "671d7ba"
    if not _has_commit(commit):
        pytest.skip(f"this checkout does not have commit {commit} (a shallow clone?)")
    out, tree = tmp_path / "ba.json", tmp_path / "before"
    try:
        run_script(
            str(BENCHMARKS / "before_after.py"),
            *("--before-commit", commit, "--before-tree", str(tree), "--data", str(official_dir)),
            *("--recipe", "seed", "--subset", "0", "--rounds", "1", "--threads", "1"),
            *("--work", str(tmp_path / "work"), "--out", str(out)),
        )
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    r = json.loads(out.read_text())
    assert r["before"]["commit"].startswith(commit) and len(r["after"]["commit"]) == 40
    assert r["train_images_per_epoch"] == 480 and r["same_data"]  # 600 images, 20% held out (seed recipe)
    for name in ("before", "after"):
        (run,) = r["runs"][name]
        assert run["tree"] == name and len(run["epoch_seconds"]) == 1 and run["img_per_s"] > 0
        assert r["median_img_per_s"][name] == pytest.approx(run["img_per_s"])
        assert 0 < r["median_epoch_seconds"][name] <= run["wall_seconds"]
    assert r["paired_ratios"] == [pytest.approx(r["ratio_after_to_before_img_per_s"])]
    assert r["median_command_cpu_seconds"]["before"] > 0 and r["median_command_cpu_seconds"]["after"] > 0
    assert r["ratio_after_to_before_img_per_s"] == pytest.approx(
        r["median_img_per_s"]["after"] / r["median_img_per_s"]["before"]
    )


@pytest.mark.slow
def test_finetune_bench_tiny(tmp_path: Path, official_dir: Path) -> None:
    """ResNet-50 at 224 px for one tiny epoch on the generated data (32 px images, upscaled on the tensor pipeline),
    and a few timed inference batches."""
    out = tmp_path / "ft.json"
    run_script(
        str(BENCHMARKS / "finetune_bench.py"),
        *("--data", str(official_dir), "--subset", "10", "--batch-size", "10", "--repeats", "1"),
        *("--infer-batch-size", "4", "--infer-batches", "1", "--threads", "1"),
        *("--work", str(tmp_path / "work"), "--out", str(out)),
        timeout=900,
    )
    r = json.loads(out.read_text())
    assert r["parameters"] == 23_512_130 and r["image_size"] == 224 and r["subset"] == 10
    (run,) = r["runs"]
    assert run["train_images"] == 10 and run["epoch_seconds"] > 0 and run["img_per_s"] > 0
    assert r["train_img_per_s"] == pytest.approx(run["img_per_s"]) and r["inference_img_per_s"] > 0


@pytest.fixture
def tiny_run(tmp_path: Path, official_dir: Path) -> Path:
    """best.pt of seed_cnn trained 1 epoch on the tiny generated data."""
    from cifar_cnn import resolve_config, train

    config = resolve_config("seed", None, dict(epochs=1, batch_size=32, device="cpu", precision="fp32"))
    train(config, str(official_dir), tmp_path / "run", home=tmp_path / "home", log=lambda m: None, threads=1)
    return tmp_path / "run" / "best.pt"


@pytest.mark.slow
def test_int8_bench_tiny(tmp_path: Path, official_dir: Path, tiny_run: Path) -> None:
    """Float and int8 ONNX timed in one run: img/s, speed-up and accuracies of each format."""
    out = tmp_path / "int8.json"
    run_script(
        str(BENCHMARKS / "int8_bench.py"),
        str(tiny_run),
        "--data",
        str(official_dir),
        *("--images", "20", "--batch-size", "10", "--repeats", "2", "--quantization-images", "16"),
        *("--threads", "1", "--json", str(out)),
        timeout=600,
    )
    r = json.loads(out.read_text())
    assert set(r["models"]) == {"float", "int8 QDQ", "int8 QDQ-float-GELU", "int8 QOperator"} and r["images"] == 20
    base = r["models"]["float"]
    for m in r["models"].values():
        assert m["img_per_s"] == pytest.approx(20 / m["median_seconds"]) and 0 <= m["accuracy"] <= 1
        assert m["speedup"] == pytest.approx(base["median_seconds"] / m["median_seconds"])


@pytest.mark.slow
def test_explain_bench_tiny(tmp_path: Path, official_dir: Path, tiny_run: Path) -> None:
    """The deletion test of every method and the calibration figures, on 20 test images."""
    out = tmp_path / "explain.json"
    run_script(
        str(BENCHMARKS / "explain_bench.py"),
        str(tiny_run),
        "--data",
        str(official_dir),
        *("--images", "20", "--random-images", "10", "--threads", "1", "--json", str(out)),
        timeout=600,
    )
    r = json.loads(out.read_text())
    assert [m["method"] for m in r["methods"]] == ["gradcam", "saliency", "integrated-gradients"]
    for m in r["methods"]:
        assert m["num_images"] == 20 and m["margin"] == pytest.approx(m["drop"] - m["surrogate_drop"])
        assert m["margin_vs_grain"] == pytest.approx(m["drop"] - m["random_drop"])
        assert m["margin_vs_pixels"] == pytest.approx(m["drop"] - m["pixel_random_drop"])
        assert (m["resolution"][0] < 32) == (m["method"] == "gradcam")  # Grad-CAM's baseline: regions of its grain
        assert -1 <= m["randomization"]["spearman_mean"] <= 1 and m["ms_per_image"] > 0
    c = r["calibration"]
    assert 0 <= c["ece"] <= 1 and c["temperature"] == 1.0 and c["uncalibrated"]["ece"] == pytest.approx(c["ece"])


def _selective_tta_module():  # the script, imported as a module (benchmarks/ is not a package)
    import importlib.util

    spec = importlib.util.spec_from_file_location("selective_tta", BENCHMARKS / "selective_tta.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selective_tta_takes_the_tta_logits_of_the_least_confident_only() -> None:
    import torch

    sel = _selective_tta_module().selective_accuracy
    plain = torch.tensor([[5.0, 0.0], [0.1, 0.0], [0.0, 0.2], [0.0, 9.0]])  # confidence: high, low, low, high
    full = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # TTA flips every prediction
    labels = torch.tensor([0, 1, 0, 1])
    assert sel(plain, full, labels, 0.0) == 0.5  # plain: right on 0 and 3
    assert sel(plain, full, labels, 0.5) == 1.0  # the two unsure ones (1 and 2) take TTA's answer: all right
    assert sel(plain, full, labels, 1.0) == 0.5  # all TTA: right on 1 and 2 only


@pytest.mark.slow
def test_selective_tta_script_on_a_tiny_run(tmp_path: Path, official_dir: Path) -> None:
    from cifar_cnn import resolve_config, train

    cfg = resolve_config("instant", None, {"device": "cpu", "eval_batch_size": 200, "batch_size": 100})
    train(cfg, str(official_dir), tmp_path / "run", log=lambda m: None, threads=1)
    out = tmp_path / "sel.json"
    done = run_script(
        str(BENCHMARKS / "selective_tta.py"),
        str(tmp_path / "run" / "best.pt"),
        *("--fractions", "0,1", "--repeats", "1", "--json", str(out)),
    )
    rows = json.loads(out.read_text())
    test = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert [r["fraction"] for r in rows] == [0.0, 1.0] and rows[1]["passes_per_image"] == 2.0
    assert rows[1]["accuracy"] == pytest.approx(
        test["accuracy"], abs=1e-6
    )  # all images with TTA: what the run's flip-TTA test measured
    assert "| 1 | " in done.stdout
