"""Training configuration: one frozen dataclass, filled from defaults < recipe < config file < command line.

Every field carries its help text, so the command-line options, the `--help` page and the error messages all come
from this one place. Unknown keys and values of the wrong type are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .choices import (
    AUTO_AUGMENTS,
    CLASS_WEIGHTS,
    DEVICES,
    LABEL_SETS,
    LOSS_REDUCTIONS,
    NORMALIZE_MODES,
    OPTIMIZERS,
    PRECISIONS,
    SAMPLERS,
    SCHEDULES,
    STORAGE_MODES,
    TTA_MODES,
)
from .errors import CifarCnnError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# Bounds on what a config file or a KEY=VALUE value may hold, checked before anything else looks at it: YAML aliases
# can make a few hundred bytes stand for billions of values (each `*a` repeats what `&a` names), so the expanded size
# is counted, not the text's.
MAX_CONFIG_BYTES = 100_000  # a config file: real ones are a few KB, and PyYAML reads about 300 KB a second
MAX_CONFIG_VALUES = 10_000  # values after aliases are expanded, in the whole file or one KEY=VALUE
MAX_CONFIG_DEPTH = 20  # nesting of lists and mappings
MAX_CONFIG_STRING = 10_000  # characters in one string (a path, a model name)
MAX_IMAGE_SIZE = 1024  # side of a model's input in pixels (pretrained hf: models use 224..518); see validate
MIN_STD = 1e-6  # a normalization std below this turns 0..1 pixels into values near float32's overflow
QUOTE_CHARS = 60  # the most of a value an error message quotes


def quoted(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)` for an error message, cut to `limit` characters with '...' (a message stays one short line
    whatever the value: a 100 KB string, a list holding itself through YAML aliases, a 5,000-digit number)."""
    if isinstance(value, (list, tuple, dict, set)) and _size_over(value, 1000):
        text = f"<a {type(value).__name__} too large to show>"
    else:
        try:
            text = repr(value)
        except (ValueError, RecursionError):  # ints beyond Python's digit limit; nesting beyond the recursion limit
            text = f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[:limit] + "..."


def _size_over(value: Any, budget: int) -> bool:
    """Whether `value`, with shared parts counted each time they appear, holds more than `budget` items."""
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > budget:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
    return False


def check_size(value: Any, where: str) -> None:
    """Refuse a parsed config value that is too big once expanded (YAML aliases), nested too deeply, or holds a
    string too long; counting stops at the first limit passed, so a bomb costs microseconds, not gigabytes."""
    stack, count = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise CifarCnnError(
                f"{where}: more than {MAX_CONFIG_VALUES:,} values once YAML aliases are expanded; a config holds a "
                "few dozen, so remove the aliases (*name) that repeat whole lists"
            )
        if depth > MAX_CONFIG_DEPTH:
            raise CifarCnnError(f"{where}: {TOO_DEEP}")
        if isinstance(item, str) and len(item) > MAX_CONFIG_STRING:
            raise CifarCnnError(
                f"{where}: a string of {len(item):,} characters ({quoted(item)}); at most {MAX_CONFIG_STRING:,}"
            )
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for pair in item.items() for v in pair)
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)


class _TooDeep(ValueError):
    """YAML nested beyond MAX_CONFIG_DEPTH, found while it is read."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the nesting bounded while it reads: its scanner keeps state per open [ or { and
    rescans it at every token (a 12 KB file of 3,000 nested brackets takes 9 s), and its composer recurses once
    per level (RecursionError)."""

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= MAX_CONFIG_DEPTH:
            raise _TooDeep
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_CONFIG_DEPTH + 1:  # + 1: the document's top-level mapping
                raise _TooDeep
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str) -> Any:
    """YAML text as Python values (safe types only), refusing nesting beyond MAX_CONFIG_DEPTH as it reads."""
    return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: plain types only, never arbitrary objects


TOO_DEEP = f"lists or mappings nested more than {MAX_CONFIG_DEPTH} deep; flatten it"


def parse_yaml_value(text: str, where: str) -> Any:
    """One KEY=VALUE value (`--model-arg`, `bench --set`) read as YAML, within the config's size limits."""
    if len(text) > MAX_CONFIG_STRING:
        raise CifarCnnError(f"{where}: a value of {len(text):,} characters; at most {MAX_CONFIG_STRING:,}")
    try:
        value = load_yaml(text)
    except (_TooDeep, RecursionError):
        raise CifarCnnError(f"{where}: the value holds {TOO_DEEP}") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise CifarCnnError(f"{where}: the value {quoted(text)} is not valid YAML ({_parse_failure(exc)})") from None
    check_size(value, where)
    return value


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes (not where it writes or how many threads it uses)."""

    recipe: str = _f("seed", "named preset this config started from (see `cifar-cnn recipes`)")
    model: str = _f("seed_cnn", "registered model name (see `cifar-cnn models`)")
    model_args: dict = _f({}, "keyword arguments for the model builder, e.g. {dropout: 0.25}")
    epochs: int = _f(10, "number of passes over the training images")
    batch_size: int = _f(20, "training images per optimizer step")
    eval_batch_size: int = _f(1000, "images per forward pass when evaluating")
    optimizer: str = _f(
        "sgd", "optimizer; muon = Muon for conv filters + Nesterov SGD (lr, momentum) for the rest", OPTIMIZERS
    )
    lr: float = _f(0.01, "peak learning rate")
    momentum: float = _f(0.0, "SGD momentum (Adam: beta1)")
    muon_lr: float = _f(0.24, "muon: learning rate of the conv filters (their norm is held fixed)")
    muon_momentum: float = _f(0.6, "muon: momentum of the conv filters")
    head_lr_factor: float = _f(1.0, "learning rate of the model's classifier head, as a multiple of lr")
    early_params_epochs: float = _f(
        3.0, "epochs over which the parameters a model marks as early (airbench: whitening bias) train, LR to 0"
    )
    nesterov: bool = _f(False, "Nesterov momentum for SGD")
    weight_decay: float = _f(0.0, "weight decay (L2 for SGD/Adam, decoupled for AdamW)")
    schedule: str = _f("constant", "learning-rate schedule over steps", SCHEDULES)
    warmup_epochs: float = _f(0.0, "epochs of linear warm-up from 0 at the start of the schedule")
    final_lr_fraction: float = _f(0.0, "learning rate at the end, as a fraction of the peak (onecycle/linear/cosine)")
    step_epochs: float = _f(30.0, "step schedule: multiply the LR by step_gamma every this many epochs")
    step_gamma: float = _f(0.1, "step schedule: the factor")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss")
    ema_decay: float = _f(
        0.0,
        "keep an exponential moving average of the weights with this decay per step (0: off; e.g. 0.99); "
        "validation, best.pt and the test use the average, last.pt keeps both",
    )
    loss_reduction: str = _f("mean", "cross-entropy over a batch: mean, or sum (LR then per image)", LOSS_REDUCTIONS)
    val_split: float = _f(0.2, "fraction of the training images held out for validation (0: train on all)")
    subset: int = _f(0, "use only this many training images, stratified (0: all)")
    patch_epochs: int = _f(
        0,
        "airbench: progressive resizing; the first N epochs run the whitening layer on non-overlapping 2x2 patches "
        "(16 x 16 maps, a quarter of the FLOPs), the rest at full resolution (0: off)",
    )
    max_train_images: int = _f(
        0, "use at most this many training images, stratified (0: all); unlike subset, fewer images are all used"
    )
    seed: int = _f(0, "seed of the split, the initial weights, shuffling, augmentation and dropout")
    mean: tuple | None = _f(None, "per-channel normalization mean of 0..1 pixels (default: the model's)")
    std: tuple | None = _f(None, "per-channel normalization std (default: the model's)")
    flip: bool = _f(False, "augmentation: random horizontal flips")
    alternate_flip: bool = _f(
        False, "augmentation: flip a fixed random half of the images, and all of them every other epoch"
    )
    translate: int = _f(0, "augmentation: random shifts of up to this many pixels (reflect padding)")
    cutout: int = _f(0, "augmentation: side of a random square blanked out (0: off)")
    crop_scale: tuple | None = _f(
        None, "augmentation: random-resized-crop, the crop's area as a fraction of the image, MIN MAX (default: off)"
    )
    crop_ratio: tuple = _f((0.75, 4 / 3), "augmentation: random-resized-crop, range of the crop's aspect ratio w/h")
    auto_augment: str = _f("none", "augmentation policy: RandAugment or TrivialAugment-wide, per image", AUTO_AUGMENTS)
    randaugment_ops: int = _f(2, "randaugment: operations applied to each image")
    randaugment_magnitude: int = _f(9, "randaugment: strength of every operation, 0..30")
    random_erasing: float = _f(0.0, "augmentation: probability of erasing a random rectangle with noise (0: off)")
    mixup_alpha: float = _f(0.0, "mixup: Beta(alpha, alpha) mixing of image pairs and their labels (0: off)")
    cutmix_alpha: float = _f(0.0, "cutmix: Beta(alpha, alpha) area pasted from another image (0: off)")
    mix_prob: float = _f(1.0, "mixup/cutmix: probability that a batch is mixed")
    mix_switch_prob: float = _f(0.5, "mixup and cutmix both on: probability of cutmix for a batch")
    class_weights: str = _f("none", "loss weights per class: auto = inverse class frequency", CLASS_WEIGHTS)
    sampler: str = _f("shuffle", "training order: balanced = classes drawn equally often", SAMPLERS)
    drop_last: bool = _f(False, "drop the last incomplete training batch of each epoch")
    device: str = _f("auto", "where to train: auto picks cuda when available", DEVICES)
    precision: str = _f(
        "auto",
        "numeric precision: auto = bf16 on CUDA and on CPUs with native bf16, else fp32 (fp16: loss scaling)",
        PRECISIONS,
    )
    channels_last: bool = _f(True, "channels-last memory layout for convolutions (faster with bf16)")
    compile: bool = _f(False, "torch.compile the model (costs 20-30 s of compilation on a CPU)")
    tta: str = _f("none", "test-time augmentation used when evaluating", TTA_MODES)
    # own data and transfer learning (see cifar_cnn.transfer)
    image_size: int = _f(0, "side images are resized to (0: the model's input size; seed_cnn takes only 32)")
    label_set: str = _f("fine", "CIFAR-100 labels: fine (100 classes) or coarse (20 superclasses)", LABEL_SETS)
    test_split: float = _f(0.2, "with --labels and no split column: fraction of the rows held out as the test split")
    image_storage: str = _f(
        "auto", "decoded images in memory, or memory-mapped from the decode cache (auto: by size)", STORAGE_MODES
    )
    normalize: str = _f(
        "auto",
        "normalization statistics: model = mean/std (or the model's), dataset = computed from the training images, "
        "auto = dataset when the classes are not CIFAR-10's and mean/std are not set beyond the recipe's, else model",
        NORMALIZE_MODES,
    )
    init_from: str = _f("", "start from this cifar-cnn checkpoint's weights (transfer learning / fine-tuning)")
    reset_head: bool = _f(False, "with init_from: a new classifier head even when the classes are the same")
    freeze_backbone: bool = _f(False, "with init_from or a pretrained hf: model: train only the classifier head")
    pretrained: bool = _f(True, "hf: models: start from the published weights (false: the same network from scratch)")
    freeze_epochs: int = _f(
        0,
        "train the head alone for this many epochs (the body in eval mode: batch norm keeps its running statistics), "
        "then everything, the body's LR warming up from 0 over unfreeze_warmup_epochs (head LR: lr x head_lr_factor)",
    )
    unfreeze_warmup_epochs: float = _f(1.0, "with freeze_epochs: epochs over which the body's LR warms up after it")
    # training controls
    patience: int = _f(0, "stop when the validation loss has not improved for this many epochs (0: never)")
    clip_grad: float = _f(0.0, "clip the gradients' global L2 norm to this value (0: off)")
    accum_steps: int = _f(1, "accumulate gradients over this many batches per optimizer step (batch_size each)")
    # calibrated confidence (see cifar_cnn.calibrate)
    calibrate: bool = _f(
        False,
        "after training, fit a softmax temperature for best.pt on the validation split (with val_split 0: on "
        "calibration_images training images held out for it) and store it in best.pt",
    )
    calibration_images: int = _f(2000, "with calibrate and val_split 0: training images held out for the fit")

    def calibration_holdout(self) -> int:
        """How many training images make_splits holds out for calibration (only used when there is no validation
        split)."""
        return self.calibration_images if self.calibrate else 0

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, not tuples), so it fits YAML, JSON and a weights-only checkpoint."""
        d = dataclasses.asdict(self)
        for k in TUPLE_LENGTHS:
            if d[k] is not None:
                d[k] = [float(v) for v in d[k]]
        return d


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TUPLE_LENGTHS = {"mean": 3, "std": 3, "crop_scale": 2, "crop_ratio": 2}  # the numbers each list-valued key holds
_TYPES = typing.get_type_hints(TrainConfig)


def field_help(name: str) -> str:
    return FIELDS[name].metadata["help"]


def field_choices(name: str) -> tuple[str, ...] | None:
    return FIELDS[name].metadata["choices"]


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check one value against the field's type; ints are accepted where floats are expected."""
    typ = _TYPES[name]
    allow_none = isinstance(typ, types.UnionType) and type(None) in typ.__args__
    base = next(a for a in typ.__args__ if a is not type(None)) if isinstance(typ, types.UnionType) else typ

    def bad(expected: str) -> CifarCnnError:
        return CifarCnnError(f"{where}: '{name}' must be {expected}, got {quoted(value)} ({type(value).__name__})")

    if value is None:
        if allow_none:
            return None
        raise bad(base.__name__)
    if base is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
            raise bad("an integer" if isinstance(value, bool) or not isinstance(value, int) else "below 2**63")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return _as_float(value, bad)
    if base is str:
        if not isinstance(value, str):
            raise bad("a string")
        choices = field_choices(name)
        if choices and value not in choices:
            raise bad(f"one of {', '.join(choices)}")
        return value
    if base is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a mapping of names to values")
        return dict(value)
    if base is tuple:
        n = TUPLE_LENGTHS[name]
        if (
            not isinstance(value, (list, tuple))
            or len(value) != n
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise bad(f"a list of {n} numbers")
        return tuple(_as_float(v, bad) for v in value)
    raise AssertionError(f"unhandled config type {typ}")  # pragma: no cover


def _as_float(value: int | float, bad: Any) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range (YAML reads 1e400 as inf, but 10**400 as an int)
        raise bad("a number below 1e308") from None


def apply(config: TrainConfig, values: dict[str, Any], where: str) -> TrainConfig:
    """`config` with `values` replacing fields; unknown keys and wrong types are errors naming `where`."""
    check_size(values, where)
    unknown = sorted((k for k in values if k not in FIELDS), key=lambda k: k if isinstance(k, str) else quoted(k))
    if unknown:
        raise CifarCnnError(f"{where}: unknown config key(s) {_unknown_keys(unknown)}")
    return dataclasses.replace(config, **{k: _coerce(k, v, where) for k, v in values.items()})


def _unknown_keys(unknown: list[Any]) -> str:
    """The first few unknown keys (each cut short), with the known keys closest to them and where to find all."""
    names = [k if isinstance(k, str) else quoted(k) for k in unknown]
    shown = ", ".join(n if len(n) <= QUOTE_CHARS else n[:QUOTE_CHARS] + "..." for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    close = {m for n in names[:5] for m in difflib.get_close_matches(n[:QUOTE_CHARS], list(FIELDS), n=2)}
    hint = f"did you mean {', '.join(sorted(close))}? " if close else ""
    return f"{shown}{more}; {hint}every key is listed by `cifar-cnn train --help` (as --key-name)"


# Sections of a config file that belong to other commands and that `train` ignores.
OTHER_SECTIONS = ("tune",)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) file as a flat dict of config keys (other commands' sections removed)."""
    return {k: v for k, v in parse_config_file(path).items() if k not in OTHER_SECTIONS}


def parse_config_file(path: str | Path) -> dict[str, Any]:
    """The whole mapping of a YAML or TOML config file, other commands' sections included."""
    p = Path(path)
    if not p.is_file():
        raise CifarCnnError(f"--config {p}: no such file")
    if p.suffix.lower() not in (".toml", ".yaml", ".yml", ".json"):
        raise CifarCnnError(f"--config {p}: use a .yaml, .yml or .toml file")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise CifarCnnError(
            f"--config {p}: {p.stat().st_size:,} bytes is more than a config file holds (at most {MAX_CONFIG_BYTES:,})"
        )
    try:
        text = p.read_text(encoding="utf-8")
        data = tomllib.loads(text) if p.suffix.lower() == ".toml" else load_yaml(text)
    except (_TooDeep, RecursionError):  # RecursionError: tomllib recurses once per level of [[[...]]]
        raise CifarCnnError(f"--config {p}: {TOO_DEEP}") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise CifarCnnError(f"--config {p}: not valid {p.suffix.lstrip('.').upper()} ({_parse_failure(exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CifarCnnError(f"--config {p}: expected a mapping of keys to values at the top level")
    check_size(data, f"--config {p}")
    return data


def _parse_failure(exc: Exception) -> str:
    """The first line of a parser's complaint, short; Python's own for a number too long to read names no fix a user
    can apply (ValueError from int(str) beyond 4,300 digits), so it is said plainly."""
    text = str(exc).strip()
    if "Exceeds the limit" in text and "digits" in text:
        return "a number of more than 4,300 digits; write a shorter one"
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 200 else first[:200] + "..."


def resolve_config(
    recipe: str | None = None, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """defaults < recipe < config file < command line. The recipe can be named on the command line or in the file."""
    from .recipes import recipe_values  # recipes are data on top of this module

    file_values = read_config_file(config_file) if config_file else {}
    overrides = dict(overrides or {})
    given = overrides.pop("recipe", None)
    where = "command line" if recipe or given else f"--config {config_file}"
    name = _recipe_name(recipe or given or file_values.get("recipe") or TrainConfig.recipe, where)
    config = apply(TrainConfig(), {**recipe_values(name), "recipe": name}, f"recipe {name}")
    file_values = {k: v for k, v in file_values.items() if k != "recipe"}
    if file_values:
        config = apply(config, _model_args_for(config, file_values), f"--config {config_file}")
    if overrides:
        overrides = _model_args_for(config, overrides)
        config = apply(config, overrides, "command line")
    return validate(_model_preprocessing(config, {*file_values, *overrides}))


def _recipe_name(value: Any, where: str) -> str:
    """A recipe's name as given, checked before it is looked up (the lookup's message quotes it)."""
    if not isinstance(value, str) or not 0 < len(value) <= QUOTE_CHARS:
        raise CifarCnnError(f"{where}: 'recipe' must be a recipe name (see `cifar-cnn recipes`), got {quoted(value)}")
    return value


# The keys that say how images are prepared; a pretrained model has its own, which only the user overrides.
PREPROCESSING_KEYS = {"mean": None, "std": None, "image_size": 0, "normalize": "model"}


def _model_preprocessing(config: TrainConfig, given: set[str]) -> TrainConfig:
    """An hf: model keeps its own input size and normalization (from its config and preprocessor files) unless a
    config file or the command line sets them: a recipe's CIFAR-10 mean/std, its image size and `normalize auto`'s
    data-set statistics are for networks trained from scratch, not for a pretrained one."""
    if not config.model.startswith("hf:"):
        return config
    return dataclasses.replace(config, **{k: v for k, v in PREPROCESSING_KEYS.items() if k not in given})


def _model_args_for(config: TrainConfig, layer: dict[str, Any]) -> dict[str, Any]:
    """A layer's model arguments add to the ones before it while the model stays the same. With another model they
    start afresh: the earlier arguments (e.g. the seed recipe's dropout) belong to the earlier model."""
    layer = dict(layer)
    same_model = layer.get("model", config.model) == config.model
    given = layer.get("model_args")
    if same_model and isinstance(given, dict):
        layer["model_args"] = {**config.model_args, **given}
    elif not same_model and given is None:
        layer["model_args"] = {}
    return layer


def _not_finite(c: TrainConfig) -> list[str]:
    """The number fields (and list items) that are NaN or infinite, as `name=value`."""
    out = []
    for name in FIELDS:  # not dataclasses.asdict: it would deep-copy model_args
        value = getattr(c, name)
        values = value if isinstance(value, tuple) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            out.append(f"{name}={value}")
    return out


def validate(c: TrainConfig) -> TrainConfig:
    """Range checks that types alone cannot express."""
    not_finite = _not_finite(c)
    if not_finite:
        raise CifarCnnError(f"invalid config: {', '.join(not_finite)[:200]}: every number must be finite")
    checks = [
        (0 <= c.seed < 2**63, f"seed must be in 0..2**63-1, got {quoted(c.seed)}"),
        (c.epochs >= 1, "epochs must be at least 1"),
        (c.batch_size >= 1, "batch_size must be at least 1"),
        (c.eval_batch_size >= 1, "eval_batch_size must be at least 1"),
        (c.lr > 0, "lr must be positive"),
        (0 <= c.momentum < 1, "momentum must be in [0, 1)"),
        (c.weight_decay >= 0, "weight_decay must be >= 0"),
        (c.muon_lr > 0 and 0 <= c.muon_momentum < 1, "muon_lr must be positive and muon_momentum in [0, 1)"),
        (c.head_lr_factor > 0 and c.early_params_epochs >= 0, "head_lr_factor must be positive"),
        (0 <= c.val_split < 1, "val_split must be in [0, 1)"),
        (c.subset >= 0, "subset must be >= 0"),
        (c.max_train_images >= 0, "max_train_images must be >= 0"),
        (0 <= c.patch_epochs < max(1, c.epochs), "patch_epochs must be >= 0 and below epochs"),
        (
            not c.patch_epochs or (c.model == "airbench" and c.model_args.get("whiten_stride", 1) == 1),
            "patch_epochs needs model airbench at whiten_stride 1 (progressive resizing of its whitening layer)",
        ),
        (0 <= c.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
        (0 <= c.ema_decay < 1, "ema_decay must be in [0, 1)"),
        (c.warmup_epochs >= 0 and c.unfreeze_warmup_epochs >= 0, "warmup epochs must be >= 0"),
        (c.translate >= 0 and c.cutout >= 0, "translate and cutout must be >= 0"),
        (c.step_epochs > 0, "step_epochs must be positive"),
        (0 <= c.final_lr_fraction <= 1, "final_lr_fraction must be in [0, 1]"),
        (not (c.nesterov and c.optimizer == "sgd" and c.momentum == 0), "nesterov needs momentum > 0"),
        (
            c.std is None or all(s >= MIN_STD for s in c.std),
            f"std values must be at least {MIN_STD:g} (pixels are divided by them), got {c.std}",
        ),
        (
            c.crop_scale is None or 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1,
            "crop_scale must be MIN MAX with 0 < MIN <= MAX <= 1",
        ),
        (0 < c.crop_ratio[0] <= c.crop_ratio[1], "crop_ratio must be MIN MAX with 0 < MIN <= MAX"),
        (0 < c.test_split < 1, "test_split must be in (0, 1)"),
        (
            c.image_size == 0 or 8 <= c.image_size <= MAX_IMAGE_SIZE,
            f"image_size (--image-size) must be 0 (the model's) or 8..{MAX_IMAGE_SIZE} pixels, got {c.image_size}; "
            "larger images need memory that grows with the square of the side (resize them beforehand)",
        ),
        (c.init_from or not c.reset_head, "reset_head needs init_from"),
        (
            c.init_from or c.model.startswith("hf:") or not c.freeze_backbone,
            "freeze_backbone needs init_from or a pretrained hf: model",
        ),
        (c.freeze_epochs >= 0, "freeze_epochs must be >= 0"),
        (
            c.freeze_epochs < c.epochs or c.freeze_epochs == 0,
            f"freeze_epochs {c.freeze_epochs} must be below epochs {c.epochs} (the body trains after it; "
            "freeze_backbone trains the head alone for the whole run)",
        ),
        (not (c.freeze_epochs and c.freeze_backbone), "freeze_epochs and freeze_backbone exclude each other"),
        (c.mixup_alpha >= 0, f"mixup_alpha must be >= 0, got {c.mixup_alpha}"),
        (c.cutmix_alpha >= 0, f"cutmix_alpha must be >= 0, got {c.cutmix_alpha}"),
        (0 <= c.random_erasing <= 1, f"random_erasing is a probability, in [0, 1], got {c.random_erasing}"),
        (0 <= c.mix_prob <= 1, f"mix_prob is a probability, in [0, 1], got {c.mix_prob}"),
        (0 <= c.mix_switch_prob <= 1, f"mix_switch_prob is a probability, in [0, 1], got {c.mix_switch_prob}"),
        (c.randaugment_ops >= 1, "randaugment_ops must be at least 1"),
        (0 <= c.randaugment_magnitude <= 30, "randaugment_magnitude must be in 0..30"),
        (c.patience >= 0, "patience must be >= 0"),
        (not (c.patience and c.val_split == 0), "patience needs a validation split: set val_split above 0"),
        (c.clip_grad >= 0, "clip_grad must be >= 0 (0: off)"),
        (c.calibration_images >= 1, "calibration_images must be at least 1"),
        (c.accum_steps >= 1, "accum_steps must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise CifarCnnError(f"invalid config: {message}")
    return c


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
