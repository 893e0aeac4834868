"""Hyper-parameter search over `engine.train` with Optuna (the `[tune]` extra).

Each trial is a whole training (into OUT/trials/NNNN/) of the base config with some values replaced by the sampler.
The objective is the best validation accuracy over the trial's epochs: trials are compared and selected on the
validation split only, and the test split is never evaluated. After every epoch the trial reports its validation
accuracy and the pruner may stop it (a median pruner by default: a trial below the median of earlier trials at the
same epoch stops); a trial whose loss diverges is pruned too.

The study lives in a database: SQLite in OUT/study.db by default (run `tune` again with the same --out, or --storage
and --study, and it continues), or any SQLAlchemy URL that Optuna accepts (e.g. postgresql://user@host/db, the
`[postgres]` extra) so that workers on several machines share one study. Workers may start at the same moment on a
fresh PostgreSQL database: opening the study (Optuna's tables, the study, its enqueued trials) is serialized by an
advisory lock, so none fails creating what another is creating (optuna/optuna#1092). Each worker runs its own
--trials and then writes the study as it stands into its own --out; the last to finish sees every trial.

The search space and the search's settings come from a `tune:` section of the config file, which `train` ignores:

    lr: 0.05                       # the base config: ordinary config keys, as for train
    tune:
      space:                       # merged over DEFAULT_SPACE; `name: null` removes a dimension
        lr: {low: 0.001, high: 0.3, log: true}       # a range (int or float as the config field is)
        batch_size: [32, 64, 128]                    # choices
        momentum: 0.9                                # a fixed value (not searched)
        weight_decay: {sgd: {low: 1e-5, high: 1e-3, log: true}, adamw: {low: 1e-3, high: 0.1, log: true}}
      pruner: median               # median or none
      startup_trials: 3            # median pruner: trials that finish before any is pruned
      warmup_epochs: 0             # median pruner: epochs a trial runs before it can be pruned
      sampler: tpe                 # tpe or random
      enqueue: [{lr: 0.01}]        # trials to run first, with these values (the rest sampled)

A mapping keyed by optimizer names (like weight_decay above) makes a dimension depend on the optimizer chosen.
Besides the config keys, the space knows `dropout` (model_args.dropout) and `augment` (see AUGMENT_LEVELS).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import inspect
import io
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes, atomic_write_text
from .config import FIELDS, TrainConfig, apply, field_choices, parse_config_file, to_yaml, validate
from .errors import CifarCnnError
from .models import model_info

# Augmentation strengths the space can choose from (translate and cutout in pixels, meant for 32px images).
AUGMENT_LEVELS: dict[str, dict[str, Any]] = {
    "none": {"flip": False, "translate": 0, "cutout": 0},
    "flip": {"flip": True, "translate": 0, "cutout": 0},
    "flip-translate": {"flip": True, "translate": 4, "cutout": 0},
    "flip-translate-cutout": {"flip": True, "translate": 4, "cutout": 8},
}

# The default search space: broad enough for an unknown data set, narrow enough that few trials find something good.
# LR ranges differ by optimizer (SGD wants ~10-100x larger steps than Adam-type optimizers).
DEFAULT_SPACE: dict[str, Any] = {
    "optimizer": ["sgd", "adamw"],
    "lr": {"sgd": {"low": 0.005, "high": 0.2, "log": True}, "adamw": {"low": 1e-4, "high": 5e-3, "log": True}},
    "momentum": {"sgd": 0.9, "adamw": 0.9},
    "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
    "batch_size": [32, 64, 128],
    "dropout": {"low": 0.0, "high": 0.5},
    "augment": ["none", "flip", "flip-translate", "flip-translate-cutout"],
    "epochs": [5, 10, 15],
}

SETTINGS = {
    "space": None,
    "pruner": "median",
    "startup_trials": 3,
    "warmup_epochs": 0,
    "sampler": "tpe",
    "enqueue": [],
}
NOT_SEARCHABLE = ("recipe", "model_args", "device", "init_from")
EXTRA_DIMENSIONS = ("dropout", "augment")


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise CifarCnnError("tune needs Optuna: pip install 'cifar-cnn[tune]' (or optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# ---- settings and search space -------------------------------------------------------------------------------------


def read_tune_settings(config_file: str | Path | None) -> dict[str, Any]:
    """The `tune:` section of a config file merged over SETTINGS, and the space merged over DEFAULT_SPACE."""
    section: Any = parse_config_file(config_file).get("tune") if config_file else None
    where = f"--config {config_file}: tune"
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise CifarCnnError(f"{where}: expected a mapping (space, pruner, startup_trials, ...)")
    unknown = sorted(set(section) - set(SETTINGS))
    if unknown:
        raise CifarCnnError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    settings = {**SETTINGS, **section}
    space = dict(DEFAULT_SPACE)
    user_space = settings["space"] or {}
    if not isinstance(user_space, dict):
        raise CifarCnnError(f"{where}.space: expected a mapping of config keys to ranges, choices or values")
    for name, spec in user_space.items():
        if spec is None:
            space.pop(name, None)
        else:
            space[name] = spec
    settings["space"] = space
    for name, spec in space.items():
        check_dimension(name, spec, f"{where}.space")
    if settings["pruner"] not in ("median", "none"):
        raise CifarCnnError(f"{where}.pruner: must be median or none, got {settings['pruner']!r}")
    if settings["sampler"] not in ("tpe", "random"):
        raise CifarCnnError(f"{where}.sampler: must be tpe or random, got {settings['sampler']!r}")
    for key in ("startup_trials", "warmup_epochs"):
        if isinstance(settings[key], bool) or not isinstance(settings[key], int) or settings[key] < 0:
            raise CifarCnnError(f"{where}.{key}: must be an integer >= 0, got {settings[key]!r}")
    if not isinstance(settings["enqueue"], list) or not all(isinstance(e, dict) for e in settings["enqueue"]):
        raise CifarCnnError(f"{where}.enqueue: expected a list of mappings of config keys to values")
    return settings


def _kind(name: str) -> type:
    """The Python type a dimension's values have."""
    if name == "dropout":
        return float
    if name == "augment":
        return str
    return type(getattr(TrainConfig(), name)) if getattr(TrainConfig(), name) is not None else float


def _is_range(spec: Any) -> bool:
    return isinstance(spec, dict) and "low" in spec and "high" in spec


def _by_optimizer(spec: Any) -> bool:
    choices = field_choices("optimizer") or ()
    return isinstance(spec, dict) and bool(spec) and all(k in choices for k in spec)


def check_dimension(name: str, spec: Any, where: str) -> None:
    """Refuse a dimension that names no config key or that is neither a range, a list of choices nor a value."""
    if name not in FIELDS and name not in EXTRA_DIMENSIONS or name in NOT_SEARCHABLE:
        raise CifarCnnError(
            f"{where}: {name!r} cannot be searched; use config keys (not {', '.join(NOT_SEARCHABLE)}), "
            f"or {', '.join(EXTRA_DIMENSIONS)}"
        )
    if _by_optimizer(spec) and name != "optimizer":
        for sub in spec.values():
            check_dimension(name, sub, where)
        return
    if _is_range(spec):
        extra = sorted(set(spec) - {"low", "high", "log", "step"})
        if extra or _kind(name) not in (int, float):
            raise CifarCnnError(f"{where}.{name}: a range takes low, high, log, step (numbers only), got {spec}")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise CifarCnnError(f"{where}.{name}: needs numbers low <= high, got {spec}")
        if spec.get("log") and low <= 0:
            raise CifarCnnError(f"{where}.{name}: a log range needs low > 0, got {spec}")
        return
    if isinstance(spec, dict):
        raise CifarCnnError(
            f"{where}.{name}: a mapping must be a range {{low, high}} or keyed by optimizer names, got {spec}"
        )
    values = spec if isinstance(spec, list) else [spec]
    if not values:
        raise CifarCnnError(f"{where}.{name}: an empty list of choices")
    if name == "augment" and any(v not in AUGMENT_LEVELS for v in values):
        raise CifarCnnError(f"{where}.augment: choose from {', '.join(AUGMENT_LEVELS)}, got {values}")


def _label(name: str, spec: Any, optimizer: str) -> str | None:
    """Optuna's name for a dimension: 'lr[adamw]' for one that depends on the optimizer (None: not for this one)."""
    if _by_optimizer(spec) and name != "optimizer":
        return f"{name}[{optimizer}]" if optimizer in spec else None
    return name


def suggest(trial: Any, space: dict[str, Any], default_optimizer: str = "sgd") -> dict[str, Any]:
    """Config values for one trial (the optimizer first: other dimensions may depend on it)."""
    values: dict[str, Any] = {}
    for name in sorted(space, key=lambda n: n != "optimizer"):
        spec = space[name]
        optimizer = values.get("optimizer", default_optimizer)
        label = _label(name, spec, optimizer)
        if label is None:
            continue
        if label != name:
            spec = spec[optimizer]
        values[name] = _suggest_one(trial, label, name, spec)
    return values


def enqueue_params(values: dict[str, Any], space: dict[str, Any], default_optimizer: str) -> dict[str, Any]:
    """An enqueued trial's values under Optuna's labels, so the sampler records them as that trial's choices."""
    optimizer = values.get("optimizer", default_optimizer)
    params = {}
    for name, v in values.items():
        label = _label(name, space[name], optimizer) if name in space else None
        if label is None:
            continue  # not searched: the value is applied as it is
        spec = space[name] if label == name else space[name][optimizer]
        if isinstance(spec, (dict, list)):  # a searched dimension (a fixed one has nothing to record)
            params[label] = v
    return params


def _suggest_one(trial: Any, label: str, name: str, spec: Any) -> Any:
    if _is_range(spec):
        log, step = bool(spec.get("log", False)), spec.get("step")
        if _kind(name) is int:
            return trial.suggest_int(label, int(spec["low"]), int(spec["high"]), log=log, step=int(step or 1))
        return trial.suggest_float(label, float(spec["low"]), float(spec["high"]), log=log, step=step)
    if isinstance(spec, list):
        return trial.suggest_categorical(label, spec)
    return spec  # a fixed value


def config_for(base: TrainConfig, values: dict[str, Any], where: str = "tune trial") -> TrainConfig:
    """The base config with a trial's values (dropout into model_args, augment expanded) applied and checked."""
    values = dict(values)
    changes: dict[str, Any] = {}
    if "augment" in values:
        changes.update(AUGMENT_LEVELS[values.pop("augment")])
    if "dropout" in values:
        changes["model_args"] = {**base.model_args, "dropout": values.pop("dropout")}
    changes.update(values)
    return validate(apply(base, changes, where))


# ---- the study -----------------------------------------------------------------------------------------------------


class TrialReporter:
    """engine.train's progress hook for one trial: reports validation accuracy per epoch, prunes when told."""

    def __init__(self, trial: Any, optuna: Any) -> None:
        self.trial, self.optuna = trial, optuna

    def epoch_start(self, epoch: int, epochs: int, steps: int, start_step: int, batch_size: int) -> None:
        pass

    def step(self, step: int, totals: Any) -> None:
        pass

    def epoch_end(self, row: dict[str, Any]) -> None:
        acc = row.get("val_acc")
        if acc is None:
            return
        self.trial.report(float(acc), int(row["epoch"]))
        if self.trial.should_prune():
            raise self.optuna.TrialPruned(f"validation accuracy {acc:.4f} after epoch {row['epoch']}")


def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


# ---- the storage: URL, driver, connection, a lock while the study is opened ---------------------------------------

# PostgreSQL drivers SQLAlchemy knows, in the order a plain postgresql:// URL is given one: psycopg 3 (the [postgres]
# extra; SQLAlchemy 2.1's default) first, then psycopg2 (SQLAlchemy 2.0's default), whichever is installed.
POSTGRES_DRIVERS = ("psycopg", "psycopg2")
POSTGRES_EXTRA = "pip install 'cifar-cnn[postgres]'"
CONNECT_TIMEOUT_S = 10  # an unreachable database fails in seconds, not after the OS's TCP timeout (minutes)
# The advisory lock's key (any 64-bit number the workers agree on): "cifa" in ASCII.
SCHEMA_LOCK_KEY = 0x63696661


def storage_url(url: str) -> str:
    """A plain postgresql:// (or postgres://) URL with the installed driver named, so it works whichever SQLAlchemy
    is installed (2.0 would pick psycopg2, 2.1 psycopg 3); any other URL as it is."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    for driver in POSTGRES_DRIVERS:
        if importlib.util.find_spec(driver) is not None:
            return f"postgresql+{driver}://{rest}"
    raise CifarCnnError(f"--storage {shown_url(url)}: no PostgreSQL driver is installed; {POSTGRES_EXTRA}")


def shown_url(url: str) -> str:
    """The URL for messages and files: any password replaced by ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: show a short prefix
        return url[:40]


def check_driver(url: str) -> None:
    """Refuse a URL SQLAlchemy cannot parse or whose driver is not installed, naming what to install."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        dialect = make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise CifarCnnError(f"--storage {url[:40]}: not a database URL ({str(exc).splitlines()[0][:80]})") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        hint = POSTGRES_EXTRA + " and use postgresql://" if dialect.name == "postgresql" else "install it"
        raise CifarCnnError(
            f"--storage {shown_url(url)}: its driver {exc.name or dialect.driver!r} is not installed; {hint}"
        ) from None


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options: a connect timeout for PostgreSQL (both drivers pass it to libpq)."""
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}} if url.startswith("postgresql") else {}


def unreachable(url: str, exc: Exception) -> CifarCnnError:
    """One line for a database that cannot be reached: the host and port, and the server's or OS's reason."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    lines = [line.strip() for line in str(getattr(exc, "orig", None) or exc).splitlines() if line.strip()]
    # libpq: 'connection failed: connection to server at "H", port P failed: Connection refused' (+ a hint line)
    reason = lines[0].rsplit("failed: ", 1)[-1][:100] if lines else type(exc).__name__
    return CifarCnnError(
        f"--storage {shown_url(url)}: cannot connect to the database at {u.host or 'localhost'}:{u.port or 5432} "
        f"({reason}); is the server running there, and the URL right?"
    )


@contextlib.contextmanager
def schema_lock(url: str) -> Iterator[None]:
    """Hold a PostgreSQL advisory lock while a worker creates or opens the study: workers started at the same moment
    on a fresh database would otherwise race to create Optuna's tables (optuna/optuna#1092, a duplicate key in
    pg_type) and the study (DuplicatedStudyError). Nothing to do for other databases."""
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool, **engine_kwargs(url))
    try:
        try:
            conn = engine.connect()
        except sqlalchemy.exc.OperationalError as exc:
            raise unreachable(url, exc) from None
        with conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            conn.commit()  # the lock belongs to the session, not the transaction: it is held until unlocked
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()


def open_storage(url: str, optuna: Any) -> Any:
    """Optuna's RDBStorage for the URL (tables created when missing); connection failures as one line."""
    import sqlalchemy

    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
    except sqlalchemy.exc.OperationalError as exc:
        if not url.startswith("sqlite"):
            raise unreachable(url, exc) from None
        raise cannot_open(url, exc) from None
    except (
        sqlalchemy.exc.SQLAlchemyError,
        ValueError,
        ImportError,
        RuntimeError,
        optuna.exceptions.OptunaError,
    ) as exc:
        raise cannot_open(url, exc) from None


def cannot_open(url: str, exc: Exception) -> CifarCnnError:
    """One line for a study the database refuses (permissions, a newer schema, a file that is no database, ...)."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
    return CifarCnnError(f"--storage {shown_url(url)}: cannot open the study ({first})")


# ---- the search space as Optuna stores it: a study continued with another space is refused ------------------------


class _SpaceRecorder:
    """A stand-in for an Optuna trial that records the distribution each suggest_* call would create."""

    def __init__(self, optuna: Any) -> None:
        self.d, self.distributions = optuna.distributions, {}

    def suggest_int(self, label: str, low: int, high: int, log: bool = False, step: int = 1) -> int:
        self.distributions[label] = self.d.IntDistribution(low, high, log=log, step=step)
        return low

    def suggest_float(self, label: str, low: float, high: float, log: bool = False, step: float | None = None) -> float:
        self.distributions[label] = self.d.FloatDistribution(low, high, log=log, step=step)
        return low

    def suggest_categorical(self, label: str, choices: list[Any]) -> Any:
        self.distributions[label] = self.d.CategoricalDistribution(choices)
        return choices[0]


def space_distributions(space: dict[str, Any], optuna: Any) -> tuple[dict[str, Any], set[str]]:
    """Every Optuna label the space can suggest with its distribution, and the labels every trial has (those that do
    not depend on the optimizer)."""
    recorder = _SpaceRecorder(optuna)
    always = set()
    for name, spec in space.items():
        if _by_optimizer(spec) and name != "optimizer":
            for optimizer, sub in spec.items():
                _suggest_one(recorder, f"{name}[{optimizer}]", name, sub)
        else:
            _suggest_one(recorder, name, name, spec)
            always.add(name)
    return recorder.distributions, always & set(recorder.distributions)


def _describe(dist: Any) -> str:
    if hasattr(dist, "choices"):
        return "choices " + ", ".join(_short(c) for c in dist.choices)[:60]
    return (
        f"{_short(dist.low)}..{_short(dist.high)}"
        + (" log" if dist.log else "")
        + (f" step {dist.step}" if dist.step else "")
    )


def check_same_space(study: Any, space: dict[str, Any], optuna: Any, where: str) -> None:
    """Refuse to continue a study whose trials were sampled from another search space: TPE would mix the two and
    best.yaml could come from a space the user no longer asks for."""
    current, always = space_distributions(space, optuna)
    for t in study.get_trials(deepcopy=False):
        if not t.distributions:
            continue  # a waiting (enqueued) trial: nothing sampled yet
        for label, dist in sorted(t.distributions.items()):
            now = current.get(label)
            if now is None or now != dist:
                was, is_ = _describe(dist), _describe(now) if now is not None else "not searched"
                raise CifarCnnError(
                    f"study {study.study_name!r} in {where} was searched over another space: {label} was {was}, now "
                    f"{is_}; choose another --study (or the space it was searched over)"
                )
        missing = sorted(always - set(t.distributions))
        if missing:
            raise CifarCnnError(
                f"study {study.study_name!r} in {where} was searched over another space: {missing[0]} was not "
                f"searched, now it is; choose another --study (or the space it was searched over)"
            )


def join_study(study: Any) -> int:
    """How many workers (or earlier runs) joined the study before this one; counted in the study's attributes."""
    n = int(study.user_attrs.get("workers", 0))
    study.set_user_attr("workers", n + 1)
    return n


def run_study(
    base: TrainConfig,
    data: str,
    out: str | Path,
    *,
    trials: int,
    settings: dict[str, Any] | None = None,
    study_name: str = "cifar-cnn",
    storage: str | None = None,
    threads: int | None = None,
    home: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run `trials` more trials of the study (created or continued), then write OUT/best.yaml, OUT/trials.csv and
    OUT/search.png; returns a summary. Selection uses validation accuracy only."""
    from .data import load_dataset, make_splits
    from .engine import DivergenceError, train
    from .presets import resolve_input_size

    optuna = _optuna()
    if trials < 1:
        raise CifarCnnError(f"--trials must be at least 1, got {trials}")
    settings = settings or read_tune_settings(None)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CifarCnnError(f"--out {out}: exists and is not a folder")
    if storage:
        check_driver(storage_url(storage))  # a missing driver fails now, not after the data is loaded
    # the data once up front: a bad source fails here, not in every trial, and the trials start from the cache
    ds = load_dataset(data, resolve_input_size(base), home=home, threads=threads, log=log)
    if ds.val_images is None and base.val_split == 0:
        raise CifarCnnError("tune selects on the validation split: set val_split > 0 (or give the data a val/ folder)")
    splits = make_splits(ds, base.val_split, base.seed, base.subset or None, max_train_images=base.max_train_images)
    if len(splits.val_labels) == 0:
        raise CifarCnnError("tune selects on the validation split, and it is empty: raise val_split")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarCnnError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    storage = storage_url(storage) if storage else default_storage(out)
    space = settings["space"]
    if "dropout" in space and "dropout" not in inspect.signature(model_info(base.model).builder).parameters:
        space = {k: v for k, v in space.items() if k != "dropout"}  # e.g. resnet18 has no dropout to search
    study, before = open_study(optuna, study_name, storage, base, settings, space)
    trials_dir = out / "trials"

    def objective(trial: Any) -> float:
        # an enqueued trial has its values fixed; whatever it does not fix is sampled
        values = {**suggest(trial, space, base.optimizer), **trial.user_attrs.get("enqueued", {})}
        trial.set_user_attr("config", _plain(values))
        config = config_for(base, values, f"tune trial {trial.number}")
        run_dir = trials_dir / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            result = train(
                config,
                data,
                run_dir,
                overwrite=True,
                threads=threads,
                home=home,
                log=lambda _: None,
                progress=TrialReporter(trial, optuna),
                evaluate_test=False,
            )
        except DivergenceError as exc:
            raise optuna.TrialPruned(f"diverged: {str(exc).split(';')[0]}") from None
        accs = [r["val_acc"] for r in result["history"] if r.get("val_acc") is not None]
        return max(accs)

    def report(study: Any, trial: Any) -> None:
        values = ", ".join(f"{k} {_short(v)}" for k, v in trial.user_attrs.get("config", {}).items())
        if trial.state == optuna.trial.TrialState.COMPLETE:
            outcome = f"val acc {100 * trial.value:.2f}%"
        elif trial.state == optuna.trial.TrialState.PRUNED:
            steps = sorted(trial.intermediate_values)
            outcome = f"pruned after epoch {steps[-1]}" if steps else "pruned (diverged)"
        else:
            outcome = str(trial.state.name).lower()
        best = _best(study.trials, optuna)
        tail = f"; best {100 * best.value:.2f}% (trial {best.number})" if best is not None else ""
        log(f"trial {trial.number}: {values} -> {outcome}{tail}")

    t0 = time.perf_counter()
    log(f"study {study_name!r} in {shown_url(storage)}: {before} trial(s) so far; running {trials} more")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")  # an enqueued value, on purpose
        study.optimize(objective, n_trials=trials, catch=(CifarCnnError,), callbacks=[report])
    seconds = time.perf_counter() - t0
    summary = write_results(study, base, out, optuna, storage=shown_url(storage), seconds=seconds, log=log)
    return summary | ({"skipped_images": len(ds.skipped)} if ds.skipped else {})  # --skip-bad: the command exits 1


def open_study(
    optuna: Any, study_name: str, storage: str, base: TrainConfig, settings: dict[str, Any], space: dict[str, Any]
) -> tuple[Any, int]:
    """Create or continue the study, under the schema lock (its tables, the study itself and its enqueued trials are
    created once however many workers start together); returns it and its number of trials so far."""
    import sqlalchemy

    if settings["pruner"] == "median":
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=settings["startup_trials"], n_warmup_steps=settings["warmup_epochs"]
        )
    else:
        pruner = optuna.pruners.NopPruner()
    check_driver(storage)
    with schema_lock(storage):
        rdb = open_storage(storage, optuna)
        try:
            study = optuna.create_study(
                study_name=study_name, storage=rdb, direction="maximize", pruner=pruner, load_if_exists=True
            )
        except (sqlalchemy.exc.SQLAlchemyError, ValueError, optuna.exceptions.OptunaError) as exc:
            raise cannot_open(storage, exc) from None
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise CifarCnnError(
                f"study {study_name!r} in {shown_url(storage)} is not a maximization study; choose another --study"
            )
        check_same_space(study, space, optuna, shown_url(storage))
        before = len(study.trials)
        # a seed per worker: a second worker (or a continuation) does not replay the first one's samples
        seed = base.seed + join_study(study)
        if before == 0:
            for values in settings["enqueue"]:
                config_for(base, values, "tune.enqueue")  # refuse bad values now, not in a trial
                params = enqueue_params(values, settings["space"], base.optimizer)
                study.enqueue_trial(params, user_attrs={"enqueued": _plain(values)}, skip_if_exists=True)
    sampler_cls = optuna.samplers.TPESampler if settings["sampler"] == "tpe" else optuna.samplers.RandomSampler
    study.sampler = sampler_cls(seed=seed)
    return study, before


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _best(trials: list[Any], optuna: Any) -> Any:
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def write_results(
    study: Any,
    base: TrainConfig,
    out: Path,
    optuna: Any,
    *,
    storage: str,
    seconds: float = 0.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """best.yaml (a config file `train --config` accepts), trials.csv, search.png and the summary, all from one
    snapshot of the study as it stands now (with several workers: the last to finish sees every trial)."""
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    best = _best(trials, optuna)
    if best is None:
        raise CifarCnnError(f"no trial of study {study.study_name!r} completed ({states}); see the messages above")
    best_config = config_for(base, best.user_attrs["config"], "best trial")
    header = (
        f"# best trial {best.number} of study {study.study_name!r} ({storage}): validation accuracy {best.value:.4f}\n"
        f"# train it with: cifar-cnn train --config {out / 'best.yaml'} --data SOURCE --out DIR\n"
    )
    atomic_write_text(out / "best.yaml", header + to_yaml(best_config))
    _write_trials_csv(out / "trials.csv", trials)
    plot = _plot(out / "search.png", study.study_name, trials, optuna, log)
    summary = {
        "study": study.study_name,
        "storage": storage,
        "trials": len(trials),
        "states": states,
        "best": {
            "trial": best.number,
            "val_acc": best.value,
            "values": best.user_attrs["config"],
            "run_dir": best.user_attrs.get("run_dir"),
        },
        "best_config": str(out / "best.yaml"),
        "trials_csv": str(out / "trials.csv"),
        "plot": str(plot) if plot else None,
        "seconds": round(seconds, 3),
    }
    atomic_write_text(out / "tune.json", json.dumps(summary, indent=2) + "\n")
    log(
        f"best: trial {best.number}, validation accuracy {100 * best.value:.2f}%; config {out / 'best.yaml'}"
        + (f"; plot {plot}" if plot else "")
    )
    return summary


def _write_trials_csv(path: Path, trials: list[Any]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trial", "state", "val_acc", "epochs_reported", "seconds", "values"])
    for t in trials:
        ended = t.datetime_complete and t.datetime_start
        secs = (t.datetime_complete - t.datetime_start).total_seconds() if ended else ""
        w.writerow(
            [
                t.number,
                t.state.name.lower(),
                "" if t.value is None else t.value,
                len(t.intermediate_values),
                secs,
                json.dumps(t.user_attrs.get("config", {})),
            ]
        )
    atomic_write_text(path, buf.getvalue())


def _plot(path: Path, study_name: str, trials: list[Any], optuna: Any, log: Callable[[str], None]) -> Path | None:
    """Validation accuracy per trial (pruned trials at their last reported value) and the best so far."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no search plot: matplotlib is not installed (pip install 'cifar-cnn[report]')")
        return None
    done, pruned, best_x, best_y = [], [], [], []
    best = -math.inf
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None:
            done.append((t.number, t.value))
            best = max(best, t.value)
        elif t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values:
            pruned.append((t.number, t.intermediate_values[max(t.intermediate_values)]))
        if best > -math.inf:
            best_x.append(t.number)
            best_y.append(best)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if done:
        ax.scatter(*zip(*done), color="tab:blue", label="completed trial", zorder=3)
    if pruned:
        ax.scatter(*zip(*pruned), color="tab:red", marker="x", label="pruned (last reported)", zorder=3)
    if best_x:
        ax.step(best_x, best_y, where="post", color="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"study {study_name}: {len(trials)} trials")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
    return path
