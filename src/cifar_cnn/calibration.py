"""Calibrated confidence, without torch: temperature scaling and the figures that say whether probabilities mean
what they say (expected calibration error, negative log-likelihood, a reliability diagram's bins).

A model's probabilities are softmax(logits / T). T is one number per checkpoint (key `temperature`, 1.0 when absent),
fitted by `fit_temperature` on held-out images (the run's validation split, never the test split) so that the mean
negative log-likelihood is lowest (Guo et al., 2017). It changes no prediction, only how sure each one says it is.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import CifarCnnError

ECE_BINS = 15  # equal-width bins of top-1 confidence, as in Guo et al. and most papers since
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def check_temperature(value: Any, where: str) -> float:
    """A temperature read from a checkpoint or an export's metadata: a finite number > 0 (else one-line error)."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise CifarCnnError(f"{where}: its temperature {str(value)[:40]!r} is not a number; it is damaged") from None
    if not math.isfinite(t) or t <= 0:
        raise CifarCnnError(f"{where}: its temperature {t} is not a positive finite number; calibrate it again")
    return t


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in float64 (the row maximum is subtracted first)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    y = np.asarray(labels, dtype=np.int64)
    return float(-_log_softmax(z)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iterations: int = 100) -> float:
    """The temperature T that minimizes the mean NLL of softmax(logits / T) on these (held-out) images.

    The NLL is convex in b = 1/T (its second derivative is the variance of the logits under the model's own
    probabilities), so Newton's method on b, kept inside [1/100, 1/0.01], finds the optimum in a few steps."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise CifarCnnError(f"cannot fit a temperature on {len(y)} images; it needs held-out images with labels")
    zy = z[np.arange(len(y)), y]
    b = 1.0
    lo, hi = 1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE
    for _ in range(iterations):
        p = np.exp(_log_softmax(b * z))
        mean_z = (p * z).sum(1)
        grad = float((mean_z - zy).mean())
        hess = float(((p * z * z).sum(1) - mean_z**2).mean())
        if hess <= 1e-12:
            b = hi if grad < 0 else lo  # logits carry no spread: NLL is monotone in b
            break
        step = grad / hess
        new = min(max(b - step, lo), hi)
        if abs(new - b) < 1e-10 * max(1.0, b):
            b = new
            break
        b = new
    return float(1.0 / b)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per equal-width bin of top-1 confidence: its range, image count, mean confidence and accuracy (empty bins
    included with count 0), what a reliability diagram draws."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    conf = p.max(1)
    right = (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # (lo, hi] bins; 0 in the first
    out = []
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        out.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": n,
                "confidence": float(conf[m].mean()) if n else 0.0,
                "accuracy": float(right[m].mean()) if n else 0.0,
            }
        )
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the image-weighted mean over bins of |accuracy - confidence| (0..1)."""
    table = reliability(probs, labels, bins)
    n = sum(b["count"] for b in table)
    if n == 0:
        raise CifarCnnError("no images to compute a calibration error on")
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table) / n)


def calibration_metrics(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict[str, Any]:
    """What `evaluate --json` adds: `ece` and `nll` of the probabilities as served (with `temperature`), the
    temperature, `uncalibrated: {ece, nll}` at temperature 1, and the reliability bins of the served probabilities."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    served = softmax(z, temperature)
    raw = softmax(z)
    return {
        "ece": expected_calibration_error(served, y),
        "nll": nll(z, y, temperature),
        "temperature": float(temperature),
        "uncalibrated": {"ece": expected_calibration_error(raw, y), "nll": nll(z, y)},
        "mean_confidence": float(served.max(1).mean()),
        "reliability": reliability(served, y),
    }
