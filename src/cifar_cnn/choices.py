"""The closed sets of values that options take, in one torch-free place.

The config's field choices, the command line's `choices=`, the device and precision resolvers, the TTA code and the
LR schedules all read these tuples, so a new mode is added here once and appears everywhere.
"""

from __future__ import annotations

from .errors import CifarCnnError

TTA_MODES = ("none", "flip", "flip-translate")  # test-time augmentation (see cifar_cnn.evaluate.tta_logits)
TTA_VIEWS = {"none": 1, "flip": 2, "flip-translate": 6}  # forward passes per image for each TTA mode
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: see cifar_cnn.device.resolve_precision
DEVICES = ("auto", "cpu", "cuda")  # the inference commands also take cuda:N
SCHEDULES = ("constant", "onecycle", "linear", "cosine", "step")  # see cifar_cnn.schedules
OPTIMIZERS = ("sgd", "adam", "adamw", "muon")  # see cifar_cnn.optim
LOSS_REDUCTIONS = ("mean", "sum")
NORMALIZE_MODES = ("auto", "model", "dataset")  # see cifar_cnn.presets.resolve_normalization
SPLITS = ("test", "val", "train")
LABEL_SETS = ("fine", "coarse")  # CIFAR-100: its 100 classes, or its 20 superclasses
CLASS_WEIGHTS = ("none", "auto")  # auto: cross-entropy weighted by inverse class frequency
SAMPLERS = ("shuffle", "balanced")  # balanced: each epoch draws classes equally often (with replacement)
STORAGE_MODES = ("auto", "memory", "disk")  # decoded images in memory, or memory-mapped from the decode cache
AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment")  # policies of cifar_cnn.data.augment
EXPLAIN_METHODS = ("gradcam", "saliency", "integrated-gradients")  # see cifar_cnn.explain
EXPORT_FORMATS = ("onnx", "torchscript")  # see cifar_cnn.export
EXPORT_TOLERANCE = (
    1e-4  # default largest abs logit difference of an export: fp32 on another runtime differs by rounding
)


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    """`value` if it is one of `choices`, else an error naming the option and the choices."""
    if value not in choices:
        raise CifarCnnError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value
