"""The `cifar-cnn` command: argument parsing only; each subcommand calls one library function.

Conventions shared by every subcommand: `--data SOURCE` for input data, `--out PATH` for what it writes, `--json`
for one JSON object on stdout (and nothing else there), `--threads N`; exit code 0 on success, 1 on partial failure,
2 on bad usage or bad input (a one-line message, no traceback).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .choices import DEVICES, EXPORT_FORMATS, EXPORT_TOLERANCE, LABEL_SETS, PRECISIONS, SPLITS, TTA_MODES
from .config import (
    FIELDS,
    MAX_IMAGE_SIZE,
    QUOTE_CHARS,
    TUPLE_LENGTHS,
    TrainConfig,
    field_choices,
    field_help,
    parse_yaml_value,
    quoted,
)
from .errors import CifarCnnError
from .names import shown_text
from .version import __version__


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (what was wrong and where to look), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = _LONG_QUOTE.sub(lambda m: m.group(1) + "...'", message)  # argparse quotes a bad value whole
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_LONG_QUOTE = re.compile(rf"('[^'\n]{{{QUOTE_CHARS}}})[^'\n]+'")


def _bounded(kind: type, low: float, high: float | None = None, what: str = "") -> Callable[[str], Any]:
    """An argparse type: a `kind` number, finite, in [low, high] (high None: no upper bound), else a usage error
    naming the range."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            bound = f"between {low:g} and {high:g}" if high is not None else f"of at least {low:g}"
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what or 'a number'} {bound}")
        return value

    return parse


_positive_int = _bounded(int, 1, what="a whole number")
_port = _bounded(int, 0, 65535, what="a TCP port")
_image_size = _bounded(int, 8, MAX_IMAGE_SIZE, what="a side in pixels")


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def _threads(text: str) -> int:
    """--threads N: 1 up to the usable CPUs. More threads than CPUs make torch's parallel loops wait on each other
    (1,000 threads on 2 CPUs: 1,500x slower), so a larger N is refused rather than obeyed silently."""
    cpus = _usable_cpus()
    value = _bounded(int, 1, what="a whole number")(text)
    if value > cpus:
        raise argparse.ArgumentTypeError(
            f"{value}: this process may use {cpus} CPU{'s' if cpus > 1 else ''}, and more threads than CPUs make torch "
            f"many times slower; use --threads {cpus} or fewer"
        )
    return value


def _seed_list(text: str) -> list[int]:
    """--seeds 0,1,2: whole numbers from 0 to 2**32 - 1."""
    try:
        return [_bounded(int, 0, 2**32 - 1, "a seed")(s.strip()) for s in text.split(",")]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: {exc}") from None


def _logger(json_mode: bool) -> Callable[[str], None]:
    """Human-readable progress: stdout normally, stderr when stdout is reserved for --json."""
    stream = sys.stderr if json_mode else sys.stdout

    def log(message: str) -> None:
        print(shown_text(message), file=stream, flush=True)

    return log


def _strict_json(obj: Any) -> Any:
    """`obj` with every non-finite float as None: json.dumps would write NaN or Infinity, which is not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def _emit_json(obj: Any) -> None:
    """One JSON object on stdout: strict JSON (no NaN; names are shown with cifar_cnn.names.shown by whoever made
    them, and json.dumps escapes everything else that is not ASCII)."""
    sys.stdout.write(json.dumps(_strict_json(obj), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def _forgiving_streams() -> None:
    """stdout and stderr write what their encoding cannot hold (a name with an accent under LC_ALL=C or
    PYTHONIOENCODING=ascii, a surrogate escape) as backslash escapes instead of raising UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # a caller's replacement stream may not have it
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


DATA_HELP = (
    "'cifar10' or 'cifar100' (downloaded to $CIFAR_CNN_HOME), a CIFAR-10/100 python archive or folder, an "
    "image-folder tree or archive, or a folder of images with --labels"
)


def _data_options(parser: argparse.ArgumentParser, label_set: bool) -> None:
    """What goes with --data: --labels, --skip-bad, --label-set (train: a config key) and --in-memory/--on-disk."""
    parser.add_argument(
        "--labels",
        default=None,
        metavar="FILE",
        help="labels of the images in --data DIR: a CSV file (path,label[,split]; header on line 1) or JSON lines "
        '({"path", "label", "split"}); paths relative to DIR',
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip label rows naming a missing or unreadable image (counted; exit code 1 at the end) instead of "
        "stopping at the first",
    )
    if label_set:
        parser.add_argument(
            "--label-set", default=None, choices=LABEL_SETS, help="CIFAR-100: fine (100 classes) or coarse (20)"
        )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--in-memory",
        dest="image_storage",
        action="store_const",
        const="memory",
        default=argparse.SUPPRESS,
        help="hold the decoded images in memory (default: when they fit)",
    )
    where.add_argument(
        "--on-disk",
        dest="image_storage",
        action="store_const",
        const="disk",
        default=argparse.SUPPRESS,
        help="memory-map the decoded images from the decode cache in $CIFAR_CNN_HOME (default: when they do not fit)",
    )


def _data_or_cifar10(args: argparse.Namespace, config: Any = None) -> Any:
    """The DataSource of --data and its options, else CIFAR-10 (held as --in-memory/--on-disk say)."""
    from .data import DataSource

    source = _data_source(args, config)
    if source is not None and source.path:
        return source
    return DataSource.of("cifar10", storage=_storage(args, config))


def _storage(args: argparse.Namespace, config: Any = None) -> str:
    return getattr(args, "image_storage", None) or (config.image_storage if config is not None else "auto")


def _data_source(args: argparse.Namespace, config: Any = None) -> Any:
    """The DataSource that --data and its options name (for train and tune, the config's data keys too); one with no
    path when --data is not given (the run's recorded source, held as --in-memory/--on-disk say), or None."""
    from .data import DataSource

    storage = _storage(args, config)
    if not args.data:
        if getattr(args, "label_set", None):
            raise CifarCnnError("--label-set goes with --data; without --data the run's own label set is used")
        if not args.labels and storage == "auto" and not args.skip_bad:
            return None
        if args.skip_bad and not args.labels:  # the run's own source, skipping what is unreadable now
            return DataSource("", {"skip_bad": True}, storage)
    return DataSource.of(
        args.data or "",
        labels=args.labels,
        label_set=config.label_set if config is not None else getattr(args, "label_set", None),
        skip_bad=args.skip_bad,
        test_split=config.test_split if config is not None else None,
        storage=storage,
    )


def _common(
    parser: argparse.ArgumentParser, data: str | None = None, json_flag: bool = True, label_set: bool = True
) -> None:
    """--data (`data` is its help's default: 'cifar10', or what a run recorded) with its options (_data_options),
    --json, --threads."""
    if data is not None:
        parser.add_argument(
            "--data",
            default=None,
            metavar="SOURCE",
            help=f"{DATA_HELP} (default: {data})",
        )
        _data_options(parser, label_set)
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    parser.add_argument(
        "--threads",
        type=_threads,
        default=None,
        metavar="N",
        help="CPU threads for torch, at most the CPUs this process may use (default: torch's)",
    )


def _inference_options(
    parser: argparse.ArgumentParser, *, tta: bool, batch_size: int | None, device: str, precision: bool
) -> None:
    """The options of every command that runs a trained model: --tta, --batch-size, --device, --precision."""
    if tta:
        parser.add_argument(
            "--tta",
            default=None,
            choices=TTA_MODES,
            help="test-time augmentation (default: the checkpoint's)",
        )
    if batch_size is not None:
        parser.add_argument("--batch-size", type=_positive_int, default=batch_size, help="images per forward pass")
    parser.add_argument("--device", default=device, help=f"{', '.join(DEVICES)} (or cuda:N)")
    if precision:
        parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="numeric precision")


# --------------------------------------------------------------------------------------------------------------------
# train


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field; unset options do not override the recipe or the config file."""
    group = parser.add_argument_group("training config (defaults < --recipe < --config file < these options)")
    defaults = TrainConfig()
    for name, f in FIELDS.items():
        if name in ("recipe", "model_args"):
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        help_text = f"{field_help(name)} (default: {default if default is not None else 'model default'})"
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if f.type in ("bool",) or isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif name in TUPLE_LENGTHS:
            metavar = ("R", "G", "B") if TUPLE_LENGTHS[name] == 3 else ("MIN", "MAX")
            group.add_argument(flag, type=float, nargs=TUPLE_LENGTHS[name], metavar=metavar, **kwargs)
        else:
            typ = {int: int, float: float, str: str}[type(default)]
            if name == "model":  # checked against the registry when given, so building the parser needs no torch
                group.add_argument(flag, type=_model_name, **{**kwargs, "help": help_text + "; see `cifar-cnn models`"})
                continue
            group.add_argument(flag, type=typ, choices=field_choices(name), **kwargs)
    group.add_argument(
        "--dropout",
        type=float,
        default=argparse.SUPPRESS,
        help="dropout probability of models that have one (model_args.dropout; seed_cnn: 0.25)",
    )
    group.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model builder argument (repeatable; VALUE is read as YAML, e.g. width=64)",
    )


def _model_name(name: str) -> str:
    """--model NAME, checked against the model registry (imported only when the option is given)."""
    from .models import family_of, list_models

    if name not in list_models() and family_of(name) is None:
        choices = ", ".join(repr(n) for n in list_models())
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {choices})")
    return name


def _key_values(items: list[str], option: str, example: str) -> dict[str, Any]:
    """KEY=VALUE strings as a dict; each value is read as YAML (0.95, true, [1, 2], text)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CifarCnnError(f"{option} {quoted(item)}: expected KEY=VALUE, e.g. {option} {example}")
        out[key] = parse_yaml_value(value, f"{option} {quoted(key)}")  # size-checked: a value may hold YAML aliases
    return out


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {name: getattr(args, name) for name in FIELDS if name not in ("recipe", "model_args") and hasattr(args, name)}
    model_args = _key_values(args.model_arg, "--model-arg", "dropout=0.1")
    if hasattr(args, "dropout"):
        model_args["dropout"] = args.dropout
    if model_args:
        out["model_args"] = model_args
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .config import resolve_config, to_yaml
    from .distributed import env_rank
    from .engine import resume_config
    from .workflow import train_and_report

    if env_rank() > 0:  # under torchrun only rank 0 reports (see cifar_cnn.distributed)
        args.progress = args.tensorboard = args.report = args.json = False
    overrides = _overrides(args)
    if args.resume:
        if args.config or args.recipe:
            raise CifarCnnError("--resume continues a run with its own config; drop --config and --recipe")
        config = resume_config(load_checkpoint(args.resume), overrides)
        out = args.out or str(Path(args.resume).parent)
    else:
        config = resolve_config(args.recipe, args.config, overrides)
        out = args.out or f"runs/{config.recipe}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if args.print_config:
        sys.stdout.write(json.dumps(config.to_dict(), indent=2) + "\n" if args.json else to_yaml(config))
        return 0
    result, code = train_and_report(
        config,
        _data_source(args, config),
        out,
        resume=args.resume,
        overwrite=args.overwrite,
        threads=args.threads,
        progress=args.progress,
        tensorboard=args.tensorboard,
        report=args.report,
        stream=sys.stderr if args.json else sys.stdout,
        command=["cifar-cnn", *sys.argv[1:]],
        dist_timeout=args.dist_timeout,
    )
    if args.json:
        _emit_json({k: v for k, v in result.items() if k != "history"} | {"epochs": result["history"]})
    return code


def _build_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model into a run directory",
        formatter_class=_Formatter,
        description="Train a model; writes config.yaml, metrics.csv, best.pt, last.pt, "
        "test_metrics.json and run.json into --out.",
    )
    _common(p, data="cifar10; with --resume, the run's own source", label_set=False)
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default: runs/<recipe>-<time>)")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML or TOML config file")
    from .recipes import RECIPES

    p.add_argument("--recipe", default=None, choices=list(RECIPES), help="named preset (default: seed)")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue from a last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run files in a non-empty --out")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a progress bar per epoch on a terminal, plain lines elsewhere (on stderr with --json)",
    )
    p.add_argument(
        "--tensorboard", action="store_true", help="also write TensorBoard event files into DIR/tensorboard/"
    )
    p.add_argument(
        "--dist-timeout",
        type=_bounded(float, 1, 86400, "seconds"),
        default=None,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for the others before it stops with an error (default 1800)",
    )
    p.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write plots and DIR/report/index.html after training",
    )
    _add_config_options(p)
    p.set_defaults(func=cmd_train)


# --------------------------------------------------------------------------------------------------------------------
# tune


def cmd_tune(args: argparse.Namespace) -> int:
    from .config import resolve_config
    from .tune import read_tune_settings, run_study

    log = _logger(args.json)
    base = resolve_config(args.recipe, args.config, _overrides(args))
    settings = read_tune_settings(args.config)
    if args.pruner:
        settings["pruner"] = args.pruner
    out = args.out or f"runs/tune-{args.study}"
    summary = run_study(
        base,
        _data_or_cifar10(args, base),
        out,
        trials=args.trials,
        settings=settings,
        study_name=args.study,
        storage=args.storage,
        threads=args.threads,
        log=log,
    )
    if args.json:
        _emit_json(summary)
    return 1 if summary.get("skipped_images") else 0


def _build_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="hyper-parameter search (Optuna) selecting on validation accuracy",
        formatter_class=_Formatter,
        description="Train --trials configs sampled from a search space (the config file's `tune:` section over a "
        "default space of LR, weight decay, batch size, optimizer, dropout, augmentation and epochs), pruning weak "
        "trials on validation accuracy per epoch. Writes OUT/study.db (unless --storage), OUT/trials/NNNN/, "
        "OUT/best.yaml (for train --config), OUT/trials.csv, OUT/search.png and OUT/tune.json. Running it again "
        "continues the study. Needs the [tune] extra. --trials counts this worker's trials; with several workers on "
        "one --storage each writes the study as it stands when it finishes (the last one: every trial).",
    )
    _common(p, data="cifar10", label_set=False)
    p.add_argument("--trials", type=int, required=True, metavar="N", help="trials to run now")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write (default: runs/tune-<study>)")
    p.add_argument("--config", default=None, metavar="FILE", help="base config and its `tune:` section")
    from .recipes import RECIPES

    p.add_argument("--recipe", default=None, choices=list(RECIPES), help="base preset (default: seed)")
    p.add_argument("--study", default="cifar-cnn", help="study name in the storage")
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage URL shared by all workers, e.g. postgresql://user@host:5432/db (the [postgres] extra); "
        "workers on several machines give the same --storage and --study, each its own --out (default: sqlite in OUT)",
    )
    p.add_argument("--pruner", default=None, choices=("median", "none"), help="override the tune section's pruner")
    _add_config_options(p)
    p.set_defaults(func=cmd_tune)


# --------------------------------------------------------------------------------------------------------------------
# lr-find


def cmd_lr_find(args: argparse.Namespace) -> int:
    from .config import resolve_config
    from .lr_find import run_lr_find

    log = _logger(args.json)
    config = resolve_config(args.recipe, args.config, _overrides(args))
    result = run_lr_find(
        config,
        _data_or_cifar10(args, config),
        args.out,
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        steps=args.steps,
        divergence=args.divergence,
        threads=args.threads,
        log=log,
    )
    if args.json:
        _emit_json(result.to_dict())
    return 0


def _build_lr_find(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lr-find",
        help="LR range test: the loss against an exponentially rising LR, and a suggested LR",
        formatter_class=_Formatter,
        description="Train a throwaway copy of the configured model for up to --steps batches while the LR rises "
        "exponentially from --start-lr to --end-lr (each parameter group keeps its LR factor), stopping once the "
        "smoothed loss passes --divergence x its minimum. Suggests the LR where the smoothed loss falls fastest (and "
        "the minimum's LR / 10). Writes OUT/lr_find.csv, OUT/lr_find.json and OUT/lr_find.png; nothing is saved to "
        "a run.",
    )
    _common(p, data="cifar10", label_set=False)
    p.add_argument("--out", default="runs/lr_find", metavar="DIR", help="where to write the plot and the figures")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML or TOML config file")
    from .recipes import RECIPES

    p.add_argument("--recipe", default=None, choices=list(RECIPES), help="named preset (default: seed)")
    p.add_argument("--start-lr", type=float, default=1e-7, help="LR of the first step")
    p.add_argument("--end-lr", type=float, default=10.0, help="LR of the last step")
    p.add_argument("--steps", type=_positive_int, default=100, help="steps (batches) at most")
    p.add_argument(
        "--divergence", type=float, default=4.0, help="stop when the smoothed loss passes this x its minimum"
    )
    _add_config_options(p)
    p.set_defaults(func=cmd_lr_find)


# --------------------------------------------------------------------------------------------------------------------
# evaluate


def _format_metrics(m: dict[str, Any]) -> str:
    lines = [
        f"{m['split']} split: {m['num_images']} images, accuracy {100 * m['accuracy']:.2f}%, "
        f"top-5 {100 * m['top5_accuracy']:.2f}%, loss {m['loss']:.4f}, macro F1 {m['macro_f1']:.4f} (tta {m['tta']})",
    ]
    if "ece" in m:
        u = m["uncalibrated"]
        lines.append(
            f"calibration: ECE {100 * m['ece']:.2f}%, NLL {m['nll']:.4f}, mean confidence "
            f"{100 * m['mean_confidence']:.2f}% with temperature {m['temperature']:.4f} "
            f"(at 1: ECE {100 * u['ece']:.2f}%, NLL {u['nll']:.4f})"
        )
    lines.append(f"{'class':<14}{'accuracy':>10}{'F1':>8}")
    for name in m["classes"]:
        acc = m["per_class_accuracy"][name]
        lines.append(f"{name:<14}{'-' if acc is None else f'{100 * acc:.2f}%':>10}{m['per_class_f1'][name]:>8.3f}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    log = _logger(args.json)
    result = evaluate_checkpoint(
        args.checkpoint,
        _data_source(args),
        split=args.split,
        tta=args.tta,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        threads=args.threads,
        log=log,
    )
    if args.json:
        _emit_json(result.metrics)
    else:
        log(_format_metrics(result.metrics))
    return 1 if result.metrics.get("skipped_images") else 0


def _build_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint on a split",
        formatter_class=_Formatter,
        description="Accuracy, top-5, loss, per-class accuracy and F1, confusion matrix.",
    )
    p.add_argument("checkpoint", help="a .pt file written by train")
    _common(p, data="the data the checkpoint's run trained on, else cifar10")
    p.add_argument(
        "--split",
        default="test",
        choices=SPLITS,
        help="which split (val is rebuilt from the checkpoint's seed and val_split)",
    )
    _inference_options(p, tta=True, batch_size=1000, device="auto", precision=True)
    p.set_defaults(func=cmd_evaluate)


# --------------------------------------------------------------------------------------------------------------------
# report, show-data


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    log = _logger(args.json)
    summary = build_report(
        args.run_dir,
        _data_source(args),
        out=args.out,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        threads=args.threads,
        log=log,
    )
    if args.json:
        _emit_json(summary)
    return 1 if summary["test_metrics"].get("skipped_images") else 0


def _build_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="plots and an HTML report of a run directory",
        formatter_class=_Formatter,
        description="Evaluate a run's best.pt (last.pt if the run has none, e.g. an interrupted run) on the test "
        "split and write curves, confusion matrix, per-class accuracy, prediction grids, report.json and a "
        "self-contained index.html into RUN_DIR/report/.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by train")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write (default: RUN_DIR/report)")
    _inference_options(p, tta=False, batch_size=1000, device="auto", precision=True)
    _common(p, data="the run's own, recorded with the run")
    p.set_defaults(func=cmd_report)


def cmd_show_data(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .report import plot_class_samples

    if args.per_class < 1:
        raise CifarCnnError(f"--per-class must be at least 1, got {args.per_class}")
    log = _logger(args.json)
    ds = load_dataset(_data_or_cifar10(args), args.image_size, threads=args.threads, log=log)
    images, labels = (ds.train_images, ds.train_labels) if args.split == "train" else (ds.test_images, ds.test_labels)
    shown = plot_class_samples(images, labels, ds.classes, args.out, per_class=args.per_class, seed=args.seed)
    summary = {"source": args.data or "cifar10", "split": args.split, "out": args.out} | {
        k: shown[k] for k in ("classes", "shown", "indices")
    }
    if args.json:
        _emit_json(summary)
    else:
        log(f"{args.out}: {args.per_class} {args.split} images for each of {len(ds.classes)} classes")
    return 1 if ds.skipped else 0


def _build_show_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show-data",
        help="a PNG of sample images for each class",
        formatter_class=_Formatter,
        description="One row of random images (fixed by --seed) per class of a data source.",
    )
    _common(p, data="cifar10")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    p.add_argument("--split", default="train", choices=("train", "test"), help="which images")
    p.add_argument("--per-class", type=int, default=8, metavar="N", help="images per class")
    p.add_argument("--seed", type=int, default=0, help="which images are picked")
    p.add_argument("--image-size", type=_image_size, default=32, help="side the images are resized to")
    p.set_defaults(func=cmd_show_data)


# --------------------------------------------------------------------------------------------------------------------
# small commands: models, recipes, info, data


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_families, list_models, model_info

    rows = [
        {"name": n, "input_size": model_info(n).input_size, "description": model_info(n).description}
        for n in list_models()
    ]
    families = [{"prefix": f.prefix, "description": f.description} for f in list_families()]
    if args.json:
        _emit_json({"models": rows, "families": families})
    else:
        for r in rows:
            print(f"{r['name']:<16} {r['input_size']:>3}px  {r['description']}")
        for f in families:
            print(f"{f['prefix'] + '...':<16} {'':>5}  {f['description']}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .recipes import list_recipes

    rows = [{"name": r.name, "summary": r.summary, "values": r.values} for r in list_recipes()]
    if args.json:
        _emit_json({"recipes": json.loads(json.dumps(rows, default=list))})
    else:
        for r in rows:
            print(f"{r['name']:<10} {r['summary']}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import describe, load_checkpoint

    d = describe(load_checkpoint(args.checkpoint))
    if args.json:
        _emit_json(d)
    else:
        for k, v in d.items():
            print(f"{k:<16} {v}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import load_dataset

    log = _logger(args.json)
    ds = load_dataset(_data_or_cifar10(args), args.image_size, threads=args.threads, log=log)
    summary = {
        "source": args.data or "cifar10",
        "options": _data_or_cifar10(args).options,
        "classes": ds.classes,
        "image_size": ds.image_size,
        "train_images": int(len(ds.train_labels)),
        "test_images": int(len(ds.test_labels)),
        "val_images": None if ds.val_labels is None else int(len(ds.val_labels)),
        "train_per_class": {c: int((ds.train_labels == i).sum()) for i, c in enumerate(ds.classes)},
        "skipped": ds.skipped,
    }
    if args.json:
        _emit_json(summary)
    else:
        for k, v in summary.items():
            print(f"{k:<16} {v}")
    return 1 if ds.skipped else 0


def _build_small(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models", formatter_class=_Formatter)
    _common(p)
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("recipes", help="list the named training presets", formatter_class=_Formatter)
    _common(p)
    p.set_defaults(func=cmd_recipes)
    p = sub.add_parser("info", help="describe a checkpoint", formatter_class=_Formatter)
    p.add_argument("checkpoint", help="a .pt file written by train")
    _common(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("data", help="decode a data source into the cache and summarize it", formatter_class=_Formatter)
    _common(p, data="cifar10")
    p.add_argument("--image-size", type=_image_size, default=32, help="side the images are resized to")
    p.set_defaults(func=cmd_data)


# --------------------------------------------------------------------------------------------------------------------
# predict, export, serve (issue 5)


def cmd_predict(args: argparse.Namespace) -> int:
    from .errors import PartialFailure
    from .predict_core import format_report, write_csv

    if args.onnx:  # torch-free path: onnxruntime, numpy and Pillow only
        if args.tta not in (None, "none"):
            raise CifarCnnError("--tta: exported ONNX models run without test-time augmentation; drop --tta")
        from .onnx_predict import OnnxPredictor

        predictor = OnnxPredictor(args.onnx, batch_size=args.batch_size, threads=args.threads)
        paths = args.inputs
    else:
        if len(args.inputs) < 2:
            raise CifarCnnError("give a checkpoint and at least one image file or folder: predict CHECKPOINT PATH...")
        from .predict import Predictor

        predictor = Predictor.from_checkpoint(
            args.inputs[0], tta=args.tta, device=args.device, batch_size=args.batch_size, threads=args.threads
        )
        paths = args.inputs[1:]
    report = predictor.predict_files(paths, top_k=args.top_k)
    if args.csv:
        write_csv(args.csv, report, min(args.top_k, len(predictor.classes)))
    if args.json:
        _emit_json(report.to_dict())
    elif report.predictions:
        print(format_report(report), flush=True)
    for e in report.errors if not args.json else []:
        print(f"cifar-cnn: {e['error']}", file=sys.stderr)
    if report.errors:
        total = len(report.predictions) + len(report.errors)
        raise PartialFailure(
            f"{len(report.errors)} of {total} inputs could not be predicted, {len(report.predictions)} were "
            f"(first: {report.errors[0]['error']})"
        )
    return 0


def _build_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify image files and folders",
        formatter_class=_Formatter,
        usage="cifar-cnn predict CHECKPOINT PATH... [options]\n       cifar-cnn predict --onnx FILE PATH... [options]",
        description="Top-k labels with probabilities for image files and folders (searched recursively), with the "
        "evaluation preprocessing (RGB, shorter side resized, centre crop). Unreadable files are listed as errors "
        "while the rest are predicted (exit code 1). --onnx runs an exported model through onnxruntime, without torch.",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="CHECKPOINT PATH", help="a .pt checkpoint (not with --onnx), then files/folders"
    )
    p.add_argument("--onnx", default=None, metavar="FILE", help="predict with an exported .onnx model instead")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="how many labels per image")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the predictions and errors as CSV")
    _inference_options(p, tta=True, batch_size=256, device="cpu", precision=False)
    _common(p)
    p.set_defaults(func=cmd_predict)


def cmd_export(args: argparse.Namespace) -> int:
    from .errors import PartialFailure
    from .export import export_checkpoint

    log = _logger(args.json)
    report = export_checkpoint(
        args.checkpoint,
        args.format,
        args.out,
        data=_data_source(args),
        num_images=args.num_images,
        tolerance=args.tolerance,
        int8=args.int8,
        gate_images=args.gate_images,
        calibration_count=args.quantization_images,
        max_accuracy_drop=args.max_accuracy_drop,
        gelu_lookups=not args.standard_onnx,
        threads=args.threads,
        log=log,
    )
    if args.json:
        _emit_json(report)
    if not report["parity_ok"]:
        raise PartialFailure(
            f"{args.out} was written but differs from PyTorch beyond --tolerance {args.tolerance:g} "
            f"(max abs logit difference {report['parity']['max_abs_logit_diff']:.2e}, "
            f"top-1 agreement {100 * report['parity']['top1_agreement']:.2f}%)"
        )
    return 1 if report.get("skipped_images") else 0


def _build_export(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX or TorchScript, checked against PyTorch",
        formatter_class=_Formatter,
        description="Writes FILE (dynamic batch size; input: normalized float32 images; output: logits) and FILE.json "
        "(classes, normalization, input size, softmax temperature, and the parity check against PyTorch on real test "
        "images). Exported models run without test-time augmentation. --int8 (ONNX) quantizes the model statically "
        "with onnxruntime (per-channel int8 weights, activations calibrated on training images) and keeps it only "
        "when its top-1 accuracy on test images is within --max-accuracy-drop points of the float model's; "
        "otherwise exit code 1 and nothing is written.",
    )
    p.add_argument("checkpoint", help="a .pt file written by train")
    p.add_argument(
        "--format", required=True, choices=EXPORT_FORMATS, help="onnx (needs the [export] extra) or torchscript"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="the exported model file")
    p.add_argument("--num-images", type=int, default=1000, help="test images compared")
    p.add_argument(
        "--tolerance",
        type=_bounded(float, 0.0, what="a tolerance"),
        default=EXPORT_TOLERANCE,
        help="largest allowed abs logit difference",
    )
    p.add_argument("--int8", action="store_true", help="quantize to int8 for CPU serving (with --format onnx)")
    p.add_argument("--gate-images", type=_positive_int, default=2000, help="with --int8: test images for the gate")
    p.add_argument(
        "--quantization-images",
        type=_positive_int,
        default=512,
        help="with --int8: training images (fixed seed) that calibrate the activation ranges",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=_bounded(float, -100.0, 100.0, what="points of accuracy"),
        default=0.5,
        metavar="POINTS",
        help="with --int8: largest allowed top-1 loss against the float model, in points (a negative value demands a "
        "gain, which refuses any model: a way to test the refusal)",
    )
    p.add_argument(
        "--standard-onnx",
        action="store_true",
        help="with --int8: standard ONNX operators only, for runtimes other than onnxruntime (GELUs stay in float; "
        "by default they run on int8 codes through onnxruntime's contrib operators, faster)",
    )
    _common(p, data="test images for the parity check: the data the checkpoint recorded, or run.json beside it")
    p.set_defaults(func=cmd_export)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve.app import serve
        from .serve.limits import ServeLimits, bind_socket
    except ImportError as exc:
        raise CifarCnnError(f"serve needs the [serve] extra (fastapi, uvicorn, python-multipart): {exc}") from None
    if args.onnx and args.checkpoint:
        raise CifarCnnError(f"give a checkpoint or --onnx FILE, not both (got {args.checkpoint} and {args.onnx})")
    if args.onnx and args.tta not in (None, "none"):  # onnxruntime has no gradients: served without /explain
        raise CifarCnnError("--tta: exported ONNX models run without test-time augmentation; drop --tta")
    if not args.onnx and not args.checkpoint:
        raise CifarCnnError("give a checkpoint to serve (a .pt file written by train), or --onnx FILE")
    limits = ServeLimits(
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_decodes=args.max_decodes,
        max_waiting=args.max_waiting,
    )
    with bind_socket(args.host, args.port) as sock:  # before the model loads: a taken port fails fast, in one line
        if args.onnx:
            from .onnx_predict import OnnxPredictor

            predictor = OnnxPredictor(args.onnx, threads=args.threads)
        else:
            from .predict import Predictor

            predictor = Predictor.from_checkpoint(
                args.checkpoint, tta=args.tta, device=args.device, threads=args.threads
            )
        serve(
            predictor,
            host=args.host,
            sock=sock,
            max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            limits=limits,
            allowed_hosts=args.allowed_hosts,
            docs=args.docs,
            log_level=args.log_level,
        )
    return 0


def _build_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP with a web page",
        formatter_class=_Formatter,
        usage="cifar-cnn serve CHECKPOINT [options]\n       cifar-cnn serve --onnx FILE [options]",
        description="POST /predict (multipart image upload, ?top_k=K), POST /explain (the same upload, ?method=M: "
        "a heat map of what the answer rests on; not with --onnx), GET /health, GET /metrics, GET / (a web page to "
        "pick or drop an image), /docs (OpenAPI). Concurrent requests are batched into one forward pass.",
    )
    p.add_argument("checkpoint", nargs="?", default=None, help="a .pt file written by train (not with --onnx)")
    p.add_argument("--onnx", default=None, metavar="FILE", help="serve an exported .onnx model instead (no /explain)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port")
    _inference_options(p, tta=True, batch_size=None, device="cpu", precision=False)
    p.add_argument(
        "--max-upload-mb",
        type=_bounded(float, 0.001, what="a size in MB"),
        default=10.0,
        help="largest accepted upload",
    )
    p.add_argument("--max-batch", type=int, default=32, help="most requests answered by one forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long the first request waits for others")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    _serve_limit_options(p)
    _common(p, json_flag=False)
    p.set_defaults(func=cmd_serve)


def _serve_limit_options(p: argparse.ArgumentParser) -> None:
    """serve's defences against hostile or careless clients (cifar_cnn.serve.limits.ServeLimits)."""
    p.add_argument(
        "--allowed-hosts",
        default=None,
        metavar="NAMES",
        help="Host header names answered, comma-separated, * for any (default: the --host address, plus localhost "
        "names for a loopback one; any for 0.0.0.0 or ::): guards against DNS rebinding",
    )
    p.add_argument("--docs", action="store_true", help="serve /docs and /redoc (their scripts load from a public CDN)")
    p.add_argument(
        "--max-connections",
        type=_positive_int,
        default=512,
        help="open connections at most; beyond it the one waiting longest for its client is closed",
    )
    p.add_argument(
        "--header-timeout",
        type=_bounded(float, 0.01, 3600, what="seconds"),
        default=10.0,
        metavar="S",
        help="seconds a client has to send a request header; then the connection is closed",
    )
    p.add_argument(
        "--body-timeout",
        type=_bounded(float, 0.01, 3600, what="seconds"),
        default=60.0,
        metavar="S",
        help="seconds a client has to send the body after its header; then the connection is closed",
    )
    p.add_argument(
        "--max-decodes",
        type=_positive_int,
        default=2,
        help="uploads read and decoded at once (bounds memory: see the README's Serve section)",
    )
    p.add_argument(
        "--max-waiting",
        type=_bounded(int, 0, what="a whole number"),
        default=16,
        help="uploads that wait for a decode slot; one more gets 503 with Retry-After",
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    log = _logger(args.json)
    result = run_bench(
        Path(args.out),
        recipes=(args.recipes or ("seed,instant,quick,fast" if args.pareto else "seed,quick,fast")).split(","),
        seeds=args.seeds,
        data=args.data,
        throughput_only=args.throughput_only,
        to_target=args.to_target,
        target=args.target,
        probe_images=args.probe_images,
        overrides=_key_values(args.set, "--set", "ema_decay=0.95"),
        steps=args.steps,
        device=args.device,
        threads=args.threads,
        notebook=args.notebook or args.pareto,
        pareto=args.pareto,
        log=log,
    )
    if args.json:
        _emit_json(result)
    else:
        log((Path(args.out) / "bench.md").read_text())
        if args.pareto:
            log((Path(args.out) / "pareto.md").read_text())
    return 0


def _build_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput and time-to-accuracy of the recipes",
        formatter_class=_Formatter,
        description="Train and inference img/s, achieved TFLOP/s and peak memory of each recipe's model; then, "
        "unless --throughput-only, each recipe trained per seed with the seed recipe side by side. Writes "
        "bench.json and bench.md into --out.",
    )
    _common(p)
    p.add_argument("--data", default=None, metavar="SOURCE", help="data for the time-to-accuracy runs")
    p.add_argument(
        "--recipes",
        default=None,
        help="comma-separated recipe names (default: seed,quick,fast; with --pareto seed,instant,quick,fast: add "
        "accurate for the whole frontier, hours on a CPU)",
    )
    p.add_argument("--seeds", type=_seed_list, default=[0], help="comma-separated seeds for the time-to-accuracy runs")
    p.add_argument("--out", default="runs/bench", metavar="DIR", help="where bench.json and bench.md go")
    p.add_argument("--throughput-only", action="store_true", help="skip the training runs")
    p.add_argument(
        "--to-target",
        action="store_true",
        help="instead of whole runs: test accuracy during training, and the time each recipe takes to reach the "
        "seed recipe's final test accuracy (probes excluded from the time)",
    )
    p.add_argument("--target", type=float, default=None, metavar="ACC", help="--to-target: this accuracy (0-1) instead")
    p.add_argument("--probe-images", type=int, default=5000, metavar="N", help="--to-target: test every N images")
    p.add_argument(
        "--notebook",
        action="store_true",
        help="time the teaching notebook's own training loop once per seed first (per-image tensors in a DataLoader, "
        "batch 20, SGD lr 0.01, 80/20 split, 10 epochs) and compare every recipe with it",
    )
    p.add_argument(
        "--pareto",
        action="store_true",
        help="with the notebook's loop: accuracy against wall time of every recipe, the frontier marked and the "
        "published anchors cited, in pareto.md, pareto.json and pareto.svg",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config value for every recipe but the seed baseline (repeatable), e.g. --set ema_decay=0.95",
    )
    p.add_argument("--steps", type=_positive_int, default=5, help="timed steps per throughput measurement (median)")
    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICES)} (or cuda:N)")
    p.set_defaults(func=cmd_bench)


# --------------------------------------------------------------------------------------------------------------------
# explain, calibrate (issue 15)


def cmd_explain(args: argparse.Namespace) -> int:
    from .errors import PartialFailure
    from .explain import Explainer, explanation_png

    if len(args.inputs) < 2:
        raise CifarCnnError("give a checkpoint and at least one image file or folder: explain CHECKPOINT PATH...")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CifarCnnError(f"--out {out}: exists and is not a folder; name a folder for the PNGs")
    explainer = Explainer.from_checkpoint(
        args.inputs[0],
        layer=args.layer,
        tta=args.tta,
        threads=args.threads,
        batch_size=args.batch_size,
        device=args.device,
    )
    report, images = explainer.explain_files(args.inputs[1:], args.method, args.target_class)
    if not report.explanations:
        first = report.errors[0]["error"] if report.errors else "no image files"
        raise CifarCnnError(f"nothing to explain: no readable image among {' '.join(args.inputs[1:])[:200]} ({first})")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarCnnError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    for i, (row, image) in enumerate(zip(report.explanations, images)):
        row["png"] = str(out / f"{i:04d}-{_safe_stem(row['path'])}-{args.method}.png")
        explanation_png(image, row, Path(row["png"]))
    if args.json:
        for row in report.explanations:
            row["map"] = [[round(float(v), 4) for v in line] for line in row["map"]]
        _emit_json(report.to_dict())
    else:
        for row in report.explanations:
            print(f"{row['path']}\t{row['label']}\t{100 * row['probability']:.1f}%\t{row['png']}", flush=True)
        for e in report.errors:
            print(f"cifar-cnn: {e['error']}", file=sys.stderr)
    if report.errors:
        total = len(report.explanations) + len(report.errors)
        raise PartialFailure(
            f"{len(report.errors)} of {total} inputs could not be explained, {len(report.explanations)} were "
            f"(first: {report.errors[0]['error']})"
        )
    return 0


def _safe_stem(path: str) -> str:
    """A file name part from an input path: its stem with anything but letters, digits, '-' and '_' replaced."""
    stem = Path(path).stem[:60]
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in stem) or "image"


def _build_explain(sub: argparse._SubParsersAction) -> None:
    from .choices import EXPLAIN_METHODS

    p = sub.add_parser(
        "explain",
        help="heat maps of where the model looks, per image",
        formatter_class=_Formatter,
        usage="cifar-cnn explain CHECKPOINT PATH... --out DIR [options]",
        description="A heat map per image over the model's input (the centre crop predict sees), for the class "
        "predict gives unless --target-class names another: one PNG per image in DIR with the image, the map over "
        "it and the top-3 classes. Unreadable files are listed as errors while the rest are explained (exit code 1).",
    )
    p.add_argument("inputs", nargs="+", metavar="CHECKPOINT PATH", help="a .pt checkpoint, then files/folders")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs (created if missing)")
    p.add_argument("--method", default="gradcam", choices=EXPLAIN_METHODS, help="how the map is computed")
    p.add_argument("--target-class", default=None, metavar="C", help="explain this class (name or index) instead")
    p.add_argument(
        "--layer", default=None, metavar="NAME", help="gradcam: the module to read (default: the last spatial map)"
    )
    _inference_options(p, tta=True, batch_size=64, device="cpu", precision=False)
    _common(p)
    p.set_defaults(func=cmd_explain)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate_checkpoint, check_split

    check_split(args.split)
    log = _logger(args.json)
    result = calibrate_checkpoint(
        args.checkpoint,
        _data_source(args),
        split=args.split,
        out=args.out,
        device=args.device,
        batch_size=args.batch_size,
        threads=args.threads,
        log=log,
    )
    if args.json:
        _emit_json(result)
    else:
        data = f" --data {shlex.quote(args.data)}" if args.data else ""
        log(f"the calibrated test figures: cifar-cnn evaluate {shlex.quote(result['checkpoint'])}{data}")
    return 0


def _build_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit a softmax temperature so that probabilities mean what they say",
        formatter_class=_Formatter,
        description="Temperature scaling: one number T, fitted on held-out images so that softmax(logits / T) has "
        "the lowest negative log-likelihood, stored in the checkpoint (replaced atomically) or in a copy (--out). "
        "predict, serve, evaluate, report and export use it; predictions do not change, only their probabilities.",
    )
    p.add_argument("checkpoint", help="a .pt file written by train")
    _common(p, data="the data the checkpoint's run trained on")
    p.add_argument(
        "--split",
        default="val",
        help="val: the run's validation split (or the images --calibrate held out); train: its training images; "
        "test is refused",
    )
    p.add_argument("--out", default=None, metavar="FILE", help="write a calibrated copy here instead")
    _inference_options(p, tta=False, batch_size=1000, device="auto", precision=False)
    p.set_defaults(func=cmd_calibrate)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cifar-cnn",
        formatter_class=_Formatter,
        description="Train, evaluate, explain, export and serve CIFAR-10 image classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"cifar-cnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    _build_train(sub)
    _build_tune(sub)
    _build_evaluate(sub)
    _build_report(sub)
    _build_show_data(sub)
    _build_small(sub)
    _build_bench(sub)
    _build_lr_find(sub)
    _build_predict(sub)
    _build_export(sub)
    _build_serve(sub)
    _build_explain(sub)
    _build_calibrate(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _forgiving_streams()
    parser = build_parser()  # torch-free: `predict --onnx` runs where torch is not installed
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CifarCnnError as exc:
        one_line = "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"cifar-cnn: error: {shown_text(one_line)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cifar-cnn: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("cifar-cnn: error: out of memory; use a smaller --batch-size or --subset", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cifar-cnn: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
