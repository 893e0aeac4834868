"""Pretrained image classifiers of Hugging Face `transformers` as cifar-cnn models: `--model hf:ORG/NAME` (a hub id,
downloaded and cached by huggingface_hub, or read from its cache with HF_HUB_OFFLINE=1) or `--model hf:PATH` (any
existing folder in the `save_pretrained` layout: config.json, the weights, optionally preprocessor_config.json).

transformers builds the network (ResNet, ConvNeXt, EfficientNet, MobileNet, RegNet, ViT, ... through
AutoModelForImageClassification); cifar-cnn wraps it so that `forward(x)` returns logits like every registered model,
and names its classifier as the head. Remote code (`trust_remote_code`) is never run: a model that needs it is
refused. The model's config (with the run's classes) and its preprocessing travel in every checkpoint under
`model.hf`, so a checkpoint rebuilds the network with no network access and no hub cache.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CifarCnnError
from .registry import ModelInfo, register_family

PREFIX = "hf:"
EXTRA = "pip install 'cifar-cnn[pretrained]'"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what transformers' image processors default to (IMAGENET_DEFAULT_MEAN/STD)
IMAGENET_STD = (0.229, 0.224, 0.225)
# transformers with position embeddings of a fixed grid: they take only the image size they were built for
FIXED_SIZE_TYPES = frozenset(
    {"vit", "deit", "beit", "data2vec-vision", "vit_msn", "levit", "swin", "swinv2", "pvt", "ijepa", "hiera"}
)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _transformers() -> Any:
    """The transformers package, quiet (no load reports, no progress bars); one line naming the extra if absent."""
    try:
        import transformers
    except ImportError:
        raise CifarCnnError(f"--model hf:... needs Hugging Face transformers: {EXTRA}") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class HFSource:
    """Where an hf: model's files are and what they say: its config.json and preprocessor_config.json as dicts."""

    name: str  # as given: hf:ORG/NAME or hf:PATH
    folder: Path | None  # the save_pretrained folder or hub snapshot (None: rebuilt from a checkpoint's record)
    hub_id: str | None
    config: dict[str, Any]
    preprocessor: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps to rebuild the network anywhere (plain types only)."""
        return {"config": self.config, "preprocessor": self.preprocessor, "source": self.hub_id or str(self.folder)}


def _snapshot(hub_id: str, patterns: list[str], name: str) -> Path:
    """A local folder with the hub repository's files matching `patterns`: downloaded into huggingface_hub's cache,
    or found there when offline. One-line errors say how to fill the cache or point at a folder."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise CifarCnnError(f"--model {name} needs huggingface_hub: {EXTRA}") from None
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns, local_files_only=_offline()))
    except GatedRepoError:  # a kind of RepositoryNotFoundError: it exists, but asks who downloads it
        raise CifarCnnError(
            f"--model {name}: {hub_id!r} is a gated model: accept its terms on the hub and log in (`hf auth login`, or "
            "set HF_TOKEN), or point at a folder saved with save_pretrained: --model hf:PATH"
        ) from None
    except RepositoryNotFoundError:
        raise CifarCnnError(
            f"--model {name}: no such model on the Hugging Face hub ({hub_id!r}), and no folder {hub_id!r} here; "
            "give a hub id such as hf:microsoft/resnet-50 or a save_pretrained folder"
        ) from None
    except LocalEntryNotFoundError:
        raise CifarCnnError(
            f"--model {name}: {hub_id!r} is not in the Hugging Face cache ({_cache_dir()}) and cannot be downloaded "
            f"{'(HF_HUB_OFFLINE is set)' if _offline() else '(no connection)'}; fill the cache on a machine online "
            f"(`hf download {hub_id}`, or `huggingface-cli download {hub_id}` with an older huggingface_hub; then "
            "copy the cache folder here) or point at a folder saved with save_pretrained: --model hf:PATH"
        ) from None
    except (OSError, ValueError) as exc:
        raise CifarCnnError(f"--model {name}: could not fetch {hub_id!r} from the hub ({exc})") from None


def _cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return "~/.cache/huggingface/hub"


def _read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CifarCnnError(f"--model {name}: {path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CifarCnnError(f"--model {name}: {path} does not hold a JSON object")
    return data


_HUB_SOURCES: dict[str, HFSource] = {}  # hub ids already looked up in this process (a folder is read every time)


def locate(name: str) -> HFSource:
    """The files behind `hf:REF`: REF an existing folder (absolute or relative to the working directory), else a hub
    id. Checked here: a config.json that transformers builds as an image classifier without remote code."""
    ref = name[len(PREFIX) :]
    folder, hub_id = Path(ref).expanduser(), None
    if not folder.is_dir() and name in _HUB_SOURCES:
        return _HUB_SOURCES[name]
    if not folder.is_dir():
        if not _HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
            raise CifarCnnError(
                f"--model {name}: no folder {ref!r}, and it is not a hub id (ORG/NAME); give a folder saved with "
                "save_pretrained or a hub id such as hf:microsoft/resnet-50"
            )
        hub_id, folder = ref, _snapshot(ref, ["*.json"], name)
    folder = folder.resolve()
    if not (folder / "config.json").is_file():
        raise CifarCnnError(
            f"--model {name}: {folder} has no config.json, so it holds no model; save one there with "
            "model.save_pretrained(folder), or give a hub id"
        )
    config = _read_json(folder / "config.json", name)
    check_config(config, name)
    pre = folder / "preprocessor_config.json"
    preprocessor = _read_json(pre, name) if pre.is_file() else {}
    source = HFSource(name, folder, hub_id, config, preprocessor)
    if hub_id is not None:
        _HUB_SOURCES[name] = source
    return source


def check_config(config: dict[str, Any], name: str) -> None:
    """Refuse configs that need remote code or that transformers cannot build as an image classifier."""
    model_type = config.get("model_type")
    if "auto_map" in config:
        raise CifarCnnError(
            f"--model {name}: the model needs its own code from the hub (trust_remote_code), which cifar-cnn never "
            "runs; choose a model that transformers builds itself"
        )
    _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as known

    if model_type not in known:
        raise CifarCnnError(
            f"--model {name}: its config is a {model_type!r} model, not an image classifier transformers can build "
            f"(image classifiers: {', '.join(sorted(known)[:12])}, ...)"
        )


def input_size_of(config: dict[str, Any], preprocessor: dict[str, Any]) -> int:
    """The model's own input side: the preprocessor's crop (when it crops) or resize size, else the config's (or its
    vision tower's) image_size, else 224."""
    crops = preprocessor.get("do_center_crop", True) is not False
    for key in ("crop_size", "size") if crops else ("size",):
        size = preprocessor.get(key)
        if isinstance(size, int):
            return size
        if isinstance(size, dict):
            for k in ("height", "shortest_edge", "width"):
                if isinstance(size.get(k), int):
                    return int(size[k])
    size = config.get("image_size", (config.get("vision_config") or {}).get("image_size"))
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if isinstance(size, int) else 224


def info_of(name: str, record: dict[str, Any] | None = None) -> ModelInfo:
    """Registry facts of an hf: model, from its files or from a checkpoint's record of them."""
    config, preprocessor = (record["config"], record["preprocessor"]) if record else _files(name)
    if preprocessor.get("do_normalize", True) is False:  # the model takes pixels scaled to 0..1 as they are
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean = tuple(float(v) for v in preprocessor.get("image_mean", IMAGENET_MEAN))
        std = tuple(float(v) for v in preprocessor.get("image_std", IMAGENET_STD))
    kind = config.get("model_type", "?")
    return ModelInfo(
        name,
        build,
        input_size_of(config, preprocessor),
        mean,  # type: ignore[arg-type]
        std,  # type: ignore[arg-type]
        f"Hugging Face {kind} ({config.get('_name_or_path') or name[len(PREFIX) :]})",
        any_input_size=kind not in FIXED_SIZE_TYPES and "vision_config" not in config,
    )


def _files(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    source = locate(name)
    return source.config, source.preprocessor


class HFClassifier(nn.Module):
    """A transformers image classifier whose forward takes normalized images and returns logits. Its classifier
    module (`net.classifier`) is the head; `features(x)` is what the head receives (the pooled features)."""

    head_name = "net.classifier"

    def __init__(self, net: nn.Module, record: dict[str, Any]) -> None:
        super().__init__()
        self.net = net
        self.hf_record = record  # config with the run's labels, preprocessing, where it came from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits

    @torch.no_grad()
    def check_input_size(self, size: int) -> None:
        """One image of `size` through the network (eval mode), so a model that takes only other sizes is refused in
        one line before a run starts, not with a traceback at its first step."""
        was_training = self.training
        self.eval()
        try:
            self(torch.zeros(1, 3, size, size))
        except (ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CifarCnnError(
                f"--model {self.hf_record.get('source', 'hf:...')}: it does not take {size} px images ({first}); "
                "use its own size (drop --image-size) or a model that takes any size"
            ) from None
        finally:
            self.train(was_training)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the classifier head for images x, flattened to (N, features)."""
        seen: list[torch.Tensor] = []
        handle = self.net.classifier.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            self.net(pixel_values=x)
        finally:
            handle.remove()
        return seen[0].flatten(1)


def _labelled(config: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    out = dict(config)
    out["id2label"] = {str(i): c for i, c in enumerate(classes)}
    out["label2id"] = {c: i for i, c in enumerate(classes)}
    out.pop("num_labels", None)
    return out


def _config_object(config: dict[str, Any]) -> Any:
    transformers = _transformers()
    values = {k: v for k, v in config.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(config["model_type"], **values)


def own_labels(config: dict[str, Any]) -> list[str]:
    labels = config.get("id2label") or {}
    return [str(labels[k]) for k in sorted(labels, key=lambda k: int(k))]


def build(
    num_classes: int = 10,
    *,
    name: str,
    classes: Sequence[str] | None = None,
    pretrained: bool = True,
    record: dict[str, Any] | None = None,
) -> HFClassifier:
    """The hf: model `name` for `classes`: rebuilt from a checkpoint's `record` (weights come from the checkpoint),
    else from its files, with the pretrained weights unless `pretrained` is false. The head is the model's own when
    the classes equal its labels (names and order), else new (initialized from torch's current RNG state)."""
    transformers = _transformers()
    classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:
        raise CifarCnnError(f"--model {name}: {len(classes)} class names for {num_classes} classes")
    if record is not None:
        config = _config_object(record["config"])
        return HFClassifier(_from_config(transformers, config, name), record)
    source = locate(name)
    keep_head = own_labels(source.config) == classes
    config = _config_object(source.config if keep_head else _labelled(source.config, classes))
    net = _from_config(transformers, config, name)
    if pretrained:
        _load_pretrained(net, source, keep_head)
    record = {**source.record(), "config": config.to_dict(), "pretrained": pretrained, "head_kept": keep_head}
    return HFClassifier(net, record)


def _from_config(transformers: Any, config: Any, name: str) -> nn.Module:
    try:
        net = transformers.AutoModelForImageClassification.from_config(config)
    except (ImportError, ValueError, TypeError) as exc:
        raise CifarCnnError(f"--model {name}: transformers cannot build it here ({str(exc).splitlines()[0]})") from None
    if not isinstance(getattr(net, "classifier", None), nn.Module):
        raise CifarCnnError(f"--model {name}: {type(net).__name__} has no `classifier` module to use as the head")
    return net.float()


def _load_pretrained(net: nn.Module, source: HFSource, keep_head: bool) -> None:
    """The pretrained weights into `net` (all of them, or all but the head's). transformers reads the files (any of
    its formats, sharded or not); only weight files are fetched for a hub model."""
    transformers = _transformers()
    folder = source.folder
    if source.hub_id is not None:
        folder = _snapshot(source.hub_id, ["*.json", "*.safetensors"], source.name)
        if not any((folder / f).is_file() for f in WEIGHT_FILES):
            folder = _snapshot(source.hub_id, ["*.json", "*.bin"], source.name)
    assert folder is not None
    if source.hub_id is not None and _offline() and not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise CifarCnnError(
            f"--model {source.name}: the Hugging Face cache holds {source.hub_id!r}'s config but not its weights "
            f"(HF_HUB_OFFLINE is set); fill the cache on a machine online (`hf download {source.hub_id}`), or train "
            "from scratch with --no-pretrained"
        )
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise CifarCnnError(
            f"--model {source.name}: {folder} holds no PyTorch weights ({' or '.join(WEIGHT_FILES[::2])}); "
            "train from scratch with --no-pretrained, or save the model with save_pretrained"
        )
    try:
        trained = transformers.AutoModelForImageClassification.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CifarCnnError(f"--model {source.name}: could not read its weights ({str(exc).splitlines()[0]})") from None
    state = {k: v for k, v in trained.state_dict().items() if keep_head or not _in_head(k)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if keep_head or not _in_head(k)]  # a kept head must come with the weights too
    if missing or unexpected:
        raise CifarCnnError(
            f"--model {source.name}: its weights do not fit its config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]})"
        )


def _in_head(key: str) -> bool:
    return key == "classifier" or key.startswith("classifier.")


register_family(PREFIX, info_of, build, "a Hugging Face image classifier: hf:ORG/NAME (hub) or hf:PATH (folder)")
