"""Bad-input catalogue rows for checkpoint fields, config files and command-line values (issue 16).
Gathered by test_bad_input.py; the row types and builders are in bad_input_kit.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .bad_input_kit import Case, Env, HttpCase, ckpt_file, png

DAMAGED = "the checkpoint is damaged or was not written by cifar-cnn"


def ckpt_with(e: Env, name: str, **fields: Any) -> Path:
    """The finished run's best.pt with `fields` replaced (a field set to ... is removed)."""
    ckpt = torch.load(e.run / "best.pt", weights_only=True)
    ckpt.update(fields)
    return ckpt_file(e, name, {k: v for k, v in ckpt.items() if v is not ...})


def resume_with(e: Env, name: str, **fields: Any) -> list[str]:
    """`train --resume` of the finished run's last.pt with `fields` replaced, into a new folder."""
    ckpt = torch.load(e.run / "last.pt", weights_only=True)
    ckpt.update(fields)
    return ["train", "--resume", str(ckpt_file(e, name, ckpt)), "--out", str(e.tmp / "resumed"), "--threads", "1"]


def predict_with(e: Env, name: str, **fields: Any) -> list[str]:
    image = e.tmp / "one.png"
    image.write_bytes(png())
    return ["predict", str(ckpt_with(e, name, **fields)), str(image)]


def cfg(e: Env, name: str, text: str) -> list[str]:
    """A train command on the finished run with --config holding `text`."""
    (e.tmp / name).write_text(text)
    return e.train_into_run("--data", str(e.official), "--config", str(e.tmp / name))


def alias_bomb(levels: int = 6, key: str = "mean", template: str = "[{v}, {v}, {v}]") -> str:
    """A few hundred bytes of YAML whose aliases expand to 3 x 9**levels values under `key` (the issue's 353-byte
    file took 24 s and 2 GB)."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\n{key}: {template.format(v=f'*a{levels - 1}')}\n"


CASES: list[Case] = [
    # checkpoint fields, each against its schema (checkpoint.SCHEMA)
    (
        "ckpt-input-size-huge",
        "checkpoints",
        "predict with a checkpoint whose input_size is 100000 (a 20 GB allocation)",
        lambda e: predict_with(e, "big.pt", input_size=100000),
        f"its input_size must be a whole number in 8..1024, got 100000; {DAMAGED}",
    ),
    (
        "ckpt-input-size-text",
        "checkpoints",
        "evaluate a checkpoint whose input_size is a string",
        lambda e: ["evaluate", str(ckpt_with(e, "s.pt", input_size="32")), "--data", str(e.official)],
        "its input_size must be a whole number in 8..1024, got '32'",
    ),
    (
        "ckpt-model-not-mapping",
        "checkpoints",
        "info on a checkpoint whose model is a plain string",
        lambda e: ["info", str(ckpt_with(e, "m.pt", model="seed_cnn"))],
        "its model must be a mapping with the model's name, got 'seed_cnn'",
    ),
    (
        "ckpt-model-args-not-mapping",
        "checkpoints",
        "a checkpoint whose model args are a list",
        lambda e: predict_with(e, "a.pt", model={"name": "seed_cnn", "args": [0.25]}),
        "its model args must be a mapping of argument names to values, got [0.25]",
    ),
    (
        "ckpt-format-version-text",
        "checkpoints",
        "a checkpoint whose format_version is a string",
        lambda e: ["info", str(ckpt_with(e, "v.pt", format_version="1"))],
        "its format_version must be a whole number of at least 1, got '1'",
    ),
    (
        "ckpt-format-version-newer",
        "checkpoints",
        "a checkpoint of a newer format version",
        lambda e: ["info", str(ckpt_with(e, "v2.pt", format_version=2))],
        "checkpoint format version 2 is newer than this cifar-cnn understands (1); upgrade cifar-cnn",
    ),
    (
        "ckpt-mean-text",
        "checkpoints",
        "a checkpoint whose mean is a string",
        lambda e: predict_with(e, "mt.pt", mean="abc"),
        "its mean must be 3 finite numbers (one per channel), got 'abc'",
    ),
    (
        "ckpt-mean-nan",
        "checkpoints",
        "a checkpoint whose mean holds a NaN (it names the mean, not the learning rate)",
        lambda e: predict_with(e, "mn.pt", mean=[float("nan"), 0.5, 0.5]),
        "its mean must be 3 finite numbers (one per channel), got [nan, 0.5, 0.5]",
    ),
    (
        "ckpt-std-zero",
        "checkpoints",
        "a checkpoint whose std holds a 0 (pixels would be divided by it)",
        lambda e: predict_with(e, "sz.pt", std=[0.5, 0.0, 0.5]),
        "its std must be 3 positive finite numbers (one per channel), got [0.5, 0.0, 0.5]",
    ),
    (
        "ckpt-classes-duplicate",
        "checkpoints",
        "a checkpoint that names a class twice",
        lambda e: predict_with(e, "cd.pt", classes=["cat"] * 10),
        "its classes must be different names, but 'cat' appears twice",
    ),
    (
        "ckpt-classes-not-text",
        "checkpoints",
        "a checkpoint whose class names are numbers",
        lambda e: predict_with(e, "cn.pt", classes=list(range(10))),
        "its classes must be names (non-empty texts), but one is 0",
    ),
    (
        "ckpt-num-classes-mismatch",
        "checkpoints",
        "a checkpoint whose num_classes differs from its class names",
        lambda e: predict_with(e, "nc.pt", num_classes=3),
        "its num_classes 3 differs from its 10 class names",
    ),
    (
        "ckpt-classes-count-not-head",
        "checkpoints",
        "a checkpoint with 3 class names for a 10-way head",
        lambda e: predict_with(e, "ch.pt", classes=["a", "b", "c"], num_classes=...),
        "weights do not fit model 'seed_cnn' (size mismatch for fc2.weight",
    ),
    (
        "ckpt-tta-unknown",
        "checkpoints",
        "a checkpoint whose tta is not a known mode (a 100 KB one: the message quotes a prefix)",
        lambda e: predict_with(e, "tta.pt", tta="x" * 100_000),
        "its tta must be one of none, flip, flip-translate, got 'xxxxxxxx",
    ),
    (
        "ckpt-calibration-bad",
        "checkpoints",
        "a checkpoint whose calibration record holds a negative temperature",
        lambda e: predict_with(e, "cal.pt", calibration={"temperature_by_tta": {"none": -1.0}}),
        "its calibration temperature_by_tta must map test-time augmentations to temperatures",
    ),
    (
        "ckpt-config-not-mapping",
        "checkpoints",
        "train --resume from a checkpoint whose config is a list",
        lambda e: resume_with(e, "cfg.pt", config=[1, 2]),
        f"its config must be a mapping, got [1, 2]; {DAMAGED}",
    ),
    (
        "ckpt-rng-state-bad",
        "checkpoints",
        "train --resume from a checkpoint whose rng_state holds a list",
        lambda e: resume_with(e, "rng.pt", rng_state={"torch": [1, 2, 3]}),
        "its rng_state must map devices to byte tensors",
    ),
    (
        "ckpt-epoch-negative",
        "checkpoints",
        "train --resume from a checkpoint at epoch -1",
        lambda e: resume_with(e, "ep.pt", epoch=-1),
        "its epoch must be a whole number of at least 0, got -1",
    ),
    (
        "ckpt-data-source-bad",
        "checkpoints",
        "a checkpoint whose data_source record is a number",
        lambda e: ["evaluate", str(ckpt_with(e, "ds.pt", data_source=7)), "--data", str(e.official)],
        "its data_source must be a mapping with the data's path, got 7",
    ),
    (
        "ckpt-history-bad",
        "checkpoints",
        "a checkpoint whose history is a string",
        lambda e: ["info", str(ckpt_with(e, "h.pt", history="x"))],
        "its history must be a list of mappings (one per epoch), got 'x'",
    ),
    # config files: bombs, nesting, sizes (config.check_size, parse_config_file)
    (
        "config-alias-bomb",
        "config",
        "a 300-byte YAML whose aliases expand to 1.6 million values under mean:",
        lambda e: cfg(e, "bomb.yaml", alias_bomb()),
        "more than 10,000 values once YAML aliases are expanded",
    ),
    (
        "config-alias-bomb-model-args",
        "config",
        "the same bomb under model_args (a mapping, so no type check stops it)",
        lambda e: cfg(e, "bomb2.yaml", alias_bomb(key="model_args", template="{{x: [{v}, {v}]}}")),
        "more than 10,000 values once YAML aliases are expanded",
    ),
    (
        "config-nested-deep",
        "config",
        "a YAML value nested 50 lists deep",
        lambda e: cfg(e, "deep.yaml", "model_args: {x: " + "[" * 50 + "]" * 50 + "}\n"),
        "lists or mappings nested more than 20 deep",
    ),
    (
        "config-nested-beyond-recursion",
        "config",
        "a YAML value nested 5,000 lists deep (the parser itself would recurse too far)",
        lambda e: cfg(e, "deeper.yaml", "lr: " + "[" * 5000 + "]" * 5000 + "\n"),
        "lists or mappings nested more than 20 deep",
    ),
    (
        "config-number-too-long",
        "config",
        "seed: a 5,000-digit number (Python refuses to read it)",
        lambda e: cfg(e, "digits.yaml", "seed: " + "9" * 5000 + "\n"),
        "a number of more than 4,300 digits",
    ),
    (
        "config-seed-huge",
        "config",
        "seed: 10**30 in a TOML file",
        lambda e: cfg(e, "seed.toml", "seed = 1" + "0" * 30 + "\n"),
        "'seed' must be below 2**63, got 1000000000000000000000000000000 (int)",
    ),
    (
        "config-long-string",
        "config",
        "optimizer: a 50 KB string (the message quotes a prefix, not the value)",
        lambda e: cfg(e, "long.yaml", "optimizer: " + "x" * 50_000 + "\n"),
        "a string of 50,000 characters ('xxxxxxxx",
    ),
    (
        "config-file-too-large",
        "config",
        "a 2 MB config file (PyYAML would take seconds to read it)",
        lambda e: cfg(e, "big.yaml", "# padding\n" * 200_000 + "epochs: 1\n"),
        "bytes is more than a config file holds",
    ),
    (
        "config-long-unknown-key",
        "config",
        "a 5,000-character key name in a TOML file (the message quotes a prefix)",
        lambda e: cfg(e, "key.toml", "k" * 5000 + " = 1\n"),
        "unknown config key(s) kkkkkkkk",
    ),
    (
        "model-arg-alias-bomb",
        "config",
        "--model-arg x=<an alias bomb>",
        lambda e: e.train_into_run("--data", str(e.official), "--model-arg", "x=" + _flow_bomb()),
        "--model-arg 'x': more than 10,000 values once YAML aliases are expanded",
    ),
    (
        "bench-set-not-yaml",
        "config",
        "bench --set with a value that is not YAML",
        lambda e: ["bench", "--set", "lr=[0.1", "--data", str(e.official), "--out", str(e.tmp / "b")],
        "--set 'lr': the value '[0.1' is not valid YAML",
    ),
    # command-line values (issue 16, item 9)
    (
        "seed-too-large",
        "usage",
        "--seed 1e23",
        lambda e: e.train_into_run("--data", str(e.official), "--seed", "1e23"),
        "argument --seed: invalid int value: '1e23'",
    ),
    (
        "export-tolerance-negative",
        "usage",
        "export --tolerance -1",
        lambda e: [
            "export",
            str(e.run / "best.pt"),
            "--format",
            "onnx",
            "--out",
            str(e.tmp / "m.onnx"),
            "--tolerance",
            "-1",
        ],
        "argument --tolerance: '-1': expected a tolerance of at least 0",
    ),
    (
        "option-value-long",
        "usage",
        "--optimizer given a 100 KB value (argparse would quote it whole)",
        lambda e: e.train_into_run("--data", str(e.official), "--optimizer", "x" * 100_000),
        "invalid choice: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...'",
    ),
    # advice that names the real cause (issue 16, item 11)
    (
        "threads-beyond-cpus",
        "usage",
        "--threads 100000 (more threads than CPUs: many times slower)",
        lambda e: ["predict", str(e.run / "best.pt"), str(e.tmp), "--threads", "100000"],
        "more threads than CPUs make torch many times slower; use --threads",
    ),
    (
        "image-size-too-large",
        "config",
        "--image-size 5000 on resnet18 (refused up front, not an out-of-memory error)",
        lambda e: e.train_into_run("--data", str(e.official), "--model", "resnet18", "--image-size", "5000"),
        "image_size (--image-size) must be 0 (the model's) or 8..1024 pixels, got 5000",
    ),
    (
        "show-data-image-size-too-large",
        "usage",
        "data --image-size 5000",
        lambda e: ["data", "--data", str(e.official), "--image-size", "5000"],
        "argument --image-size: '5000': expected a side in pixels between 8 and 1024",
    ),
    (
        "val-split-leaves-nothing",
        "config",
        "--val-split 0.999 on 20 images a class (it says so, not 'batch_size is larger')",
        lambda e: e.train_into_run("--data", str(e.official), "--val-split", "0.999"),
        "holds out all 200 training images for validation, leaving none to train on: lower --val-split",
    ),
    (
        "std-tiny",
        "config",
        "--std 1e-30 1e-30 1e-30 (pixels / std overflow)",
        lambda e: e.train_into_run("--data", str(e.official), "--std", "1e-30", "1e-30", "1e-30"),
        "std values must be at least 1e-06",
    ),
    (
        "evaluate-overflowing-model",
        "checkpoint",
        "evaluate a checkpoint whose finite weights overflow to NaN logits",
        lambda e: ["evaluate", str(_overflowing(e)), "--data", str(e.official), "--threads", "1"],
        "the model produced non-finite outputs (NaN or infinity) for 50 of 50 test images",
    ),
]
HTTP_CASES: list[HttpCase] = []


def _overflowing(e: Env) -> Path:
    """The finished run's best.pt with its fully connected weights times 1e38: finite (loading accepts them), but the
    activations overflow."""
    ckpt = torch.load(e.run / "best.pt", weights_only=True)
    for key, value in ckpt["model_state"].items():
        if key.endswith("weight") and value.ndim == 2:
            ckpt["model_state"][key] = value * 1e38
    return ckpt_file(e, "overflow.pt", ckpt)


def _flow_bomb(levels: int = 6) -> str:
    """An alias bomb as one line of flow YAML, for a KEY=VALUE option."""
    inner = "&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for i in range(1, levels):
        inner = f"&a{i} [{inner}, {', '.join([f'*a{i - 1}'] * 8)}]"
    return f"[{inner}, *a{levels - 1}, *a{levels - 1}]"
