"""Hostile configs: generated config files (YAML and TOML) and command-line values (huge numbers, NaN/inf, wrong
types, deep nesting, alias bombs, long strings, unicode, raw bytes) each end as a valid config or as a CifarCnnError
whose message is one short line, within bounded time and memory per case (issue 16, item 6)."""

from __future__ import annotations

import io
import random
import time
import tracemalloc
from collections.abc import Callable
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cifar_cnn.cli import _key_values, _overrides, build_parser
from cifar_cnn.config import FIELDS, TrainConfig, resolve_config
from cifar_cnn.engine.loop import divergence
from cifar_cnn.errors import CifarCnnError

MAX_MESSAGE = 400  # characters of an error message, besides the config file's path
MAX_SECONDS = 3.0  # per case, traced (a bomb that expanded took tens of seconds; 100 KB of YAML takes ~0.4 s)
MAX_PEAK_MB = 64  # Python allocations per case (the issue's bomb: 2 GB)
CASES_PER_SEED = 150

# Values a careless or hostile file may hold, as YAML text (TOML gets the ones that are valid TOML too).
SCALARS = [
    "0",
    "-1",
    "1e23",
    "1e400",
    "-1e400",
    ".nan",
    ".inf",
    "-.inf",
    "nan",
    "inf",
    "'nan'",
    "9" * 30,
    "9" * 4299,
    "9" * 5000,
    "-" + "9" * 200,
    "0x7fffffffffffffff",
    "true",
    "null",
    "~",
    "2024-01-01",
    "'x'",
    "''",
    "'\u202eevil\u202c'",
    "'\U0001f4a3' ",
    "'\u00e9t\u00e9'",
    "'a\\u0000b'",
    '"\\ud800"',
    "[]",
    "{}",
    "[1, 2]",
    "[0.5, 0.5, 0.5]",
    "[.nan, 1, 1]",
    "[1e400, 1, 1]",
    "[true, false, true]",
    "['a', 'b', 'c']",
    "{dropout: 0.5}",
    "{1: 2}",
    "{x: {y: {z: 1}}}",
    "!!binary aGVsbG8=",
    "!!python/object:os.system ls",
    "&a [1, *a]",
]


def long_string(rng: random.Random) -> str:
    return "'" + rng.choice("xé\U0001f4a3") * rng.choice([100, 9_999, 10_001, 200_000]) + "'"


def nested(rng: random.Random) -> str:
    depth = rng.choice([5, 21, 200, 3000])
    return "[" * depth + "1" + "]" * depth


def alias_bomb(rng: random.Random) -> str:
    """YAML lines defining anchors b0..bN, each nine times the one before, then the last as the value."""
    levels, width = rng.choice([3, 6, 9]), rng.choice([3, 9])
    lines = [f"b0: &b0 [{', '.join(['1'] * width)}]"]
    lines += [f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\n__VALUE__*b{levels - 1}"


def hostile_value(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.6:
        return rng.choice(SCALARS)
    if kind < 0.75:
        return long_string(rng)
    if kind < 0.9:
        return nested(rng)
    return alias_bomb(rng)


def hostile_key(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.8:
        return rng.choice(list(FIELDS))
    return rng.choice(["learnrate", "tune", "'\U0001f4a3'", "'" + "k" * 900 + "'", "1", "'model args'", "recipe"])


def hostile_yaml(rng: random.Random) -> str:
    """A YAML document of a few hostile entries (an alias bomb's anchors come first, as YAML needs)."""
    head, body = [], []
    for i in range(rng.randint(1, 4)):
        value = hostile_value(rng)
        key = hostile_key(rng)
        if "__VALUE__" in value:
            anchors, _, ref = value.rpartition("\n__VALUE__")
            head.append(anchors.replace("b", f"n{i}b"))
            value = ref.replace("b", f"n{i}b")
        body.append(f"{key}: {value}")
    if rng.random() < 0.1:
        return rng.choice(["- 1\n- 2\n", "", "just text\n", "{a: 1\n", "\t: x\n"])
    return "\n".join(head + body) + "\n"


def hostile_toml(rng: random.Random) -> str:
    values = [
        "nan",
        "inf",
        "-inf",
        "1e400",
        "9" * 5000,
        '"x"',
        "[1, 2]",
        "[nan, 1, 1]",
        "{a = 1}",
        '"' + "é" * 20_000 + '"',
    ]
    depth = rng.choice([3, 30, 3000])
    values.append("[" * depth + "1" + "]" * depth)
    return "\n".join(f"{rng.choice(list(FIELDS))} = {rng.choice(values)}" for _ in range(rng.randint(1, 3))) + "\n"


def bounded(run: Callable[[], Any], where: str) -> Any:
    """`run()` (what it returned, or the CifarCnnError it raised) within MAX_SECONDS and MAX_PEAK_MB; its error, if
    any, is one line of at most MAX_MESSAGE characters beyond the config file's path."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = run()
    except CifarCnnError as exc:
        message, result = str(exc), exc
        assert "\n" not in message and len(message.replace(where, "")) <= MAX_MESSAGE, (len(message), message[:500])
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    assert seconds < MAX_SECONDS and peak < MAX_PEAK_MB, (where, seconds, peak)
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generated_config_files_end_valid_or_in_one_line(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    outcomes = {"valid": 0, "refused": 0}
    for i in range(CASES_PER_SEED):
        toml = rng.random() < 0.25
        path = tmp_path / f"c{i}.{'toml' if toml else 'yaml'}"
        if rng.random() < 0.05:
            path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))))  # not text at all
        else:
            path.write_text(hostile_toml(rng) if toml else hostile_yaml(rng), encoding="utf-8")
        outcome = bounded(lambda p=path: resolve_config(None, p, {}), str(path))
        assert isinstance(outcome, (TrainConfig, CifarCnnError)), outcome
        outcomes["valid" if isinstance(outcome, TrainConfig) else "refused"] += 1
    assert outcomes["refused"] > CASES_PER_SEED // 2, outcomes  # the generator is hostile enough to be refused


def test_the_issues_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """The 353-byte file of the issue (nested aliases under mean:) took 24 s and 2 GB before."""
    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"{k}: &{k} [{', '.join([f'*{p}'] * 9)}]" for p, k in zip("abcdefg", "bcdefgh")
    ]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nmean: [*h, *h, *h]\n")
    assert path.stat().st_size < 400
    outcome = bounded(lambda: resolve_config(None, path, {}), str(path))
    assert isinstance(outcome, CifarCnnError) and "more than 10,000 values once YAML aliases are expanded" in str(
        outcome
    )


def test_small_aliases_are_still_allowed(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("mean: &m [0.5, 0.5, 0.5]\nstd: *m\nmodel_args: &a {dropout: 0.1}\n")
    config = resolve_config(None, path, {})
    assert config.mean == config.std == (0.5, 0.5, 0.5) and config.model_args == {"dropout": 0.1}


def test_messages_quote_a_short_prefix_of_a_value(tmp_path: Path) -> None:
    path = tmp_path / "long.yaml"
    path.write_text("optimizer: " + "x" * 9000 + "\n")
    with pytest.raises(CifarCnnError) as exc:
        resolve_config(None, path, {})
    message = str(exc.value)
    assert "'" + "x" * 59 + "..." in message and len(message) < 250 + len(str(path)), message


HOSTILE_TEXT = st.one_of(
    st.text(max_size=300),
    st.sampled_from(SCALARS),
    st.builds(lambda n, c: c * n, st.integers(1, 30_000), st.sampled_from(["9", "[", "x", "é", "\U0001f4a3"])),
    st.builds(lambda d: "[" * d + "]" * d, st.integers(1, 2000)),
    st.just("[&a [1,1,1,1,1,1,1,1,1], " + ", ".join(["*a"] * 40) + "]"),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from([*FIELDS, "dropout", "x"]), value=HOSTILE_TEXT)
def test_key_value_options_end_valid_or_in_one_line(key: str, value: str) -> None:
    """--model-arg / bench --set KEY=VALUE: the value read as YAML, then applied as an override."""

    def run() -> Any:
        overrides = _key_values([f"{key}={value}"], "--set", "ema_decay=0.95")
        return resolve_config(None, None, overrides if key in FIELDS else {"model_args": overrides})

    bounded(run, "")


@settings(max_examples=150, deadline=None)
@given(
    option=st.sampled_from(["--lr", "--seed", "--epochs", "--mean", "--optimizer", "--image-size", "--std"]),
    value=HOSTILE_TEXT,
)
def test_train_options_end_valid_or_in_one_line(option: str, value: str) -> None:
    """train's options through argparse, then resolve_config: argparse's own error (exit 2) or ours, one line."""
    argv = ["train", option, *([value] * (3 if option in ("--mean", "--std") else 1))]

    def run() -> Any:
        err = io.StringIO()
        try:
            with redirect_stderr(err):
                args = build_parser().parse_args(argv)
        except SystemExit as exc:
            lines = err.getvalue().strip().splitlines()
            assert exc.code == 2 and len(lines) == 1 and len(lines[0]) <= MAX_MESSAGE + 100, err.getvalue()[:500]
            return None
        return resolve_config(None, None, _overrides(args))

    bounded(run, "")


def test_nan_inputs_name_the_normalization_not_the_learning_rate() -> None:
    """A loss that is NaN because the images are (a NaN mean, a std near 0) says so; else it is divergence."""
    loss = torch.tensor(float("nan"))
    images = torch.zeros(2, 3, 4, 4)
    assert "lower the learning rate" in str(divergence(loss, images, 0, 3))
    images[0, 1, 2, 2] = float("inf")
    message = str(divergence(loss, images, 0, 3))
    assert "check the mean and std" in message and "learning rate" not in message
