"""A latency model per member and device class, fitted from its measured profile.

The forms follow where the time goes in an engine that batches requests:
- time to first token: a fixed cost, plus prefill work that grows with the prompt and with the other
  requests sharing the batch:            ttft = a0 + a1·p + a2·p·(c−1) + a3·(c−1)
- time per output token: a step cost that grows with the rows in the batch and the context they
  attend over:                           tpot = b0 + b1·(c−1) + b2·c·(p + o/2)
- end to end:                            e2e  = ttft + tpot·(o − 1)
with p prompt tokens, o output tokens, c concurrent requests. Coefficients are fitted by non-negative
least squares on relative error (each sample weighted by 1/measured), so short and long requests
count alike, and stored in the registry; the gateway corrects them with live observations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

TTFT_TERMS = ("a0", "a1", "a2", "a3")
TPOT_TERMS = ("b0", "b1", "b2")


@dataclass(frozen=True)
class LatencyPrediction:
    ttft_s: float
    tpot_s: float
    e2e_s: float


def _ttft_features(p: float, o: float, c: float) -> list[float]:
    return [1.0, p, p * (c - 1), c - 1]


def _tpot_features(p: float, o: float, c: float) -> list[float]:
    return [1.0, c - 1, c * (p + o / 2)]


def _fit(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    w = 1.0 / np.maximum(target, 1e-6)
    coef, _ = nnls(features * w[:, None], target * w)
    return coef


def fit(samples) -> dict[str, float]:
    """Coefficients from LatencySample-like objects (prompt_tokens, output_tokens, concurrency, ttft_s, tpot_s)."""
    if len(samples) < 2:
        raise ValueError("a latency model needs at least two measured request shapes")
    shape = [(s.prompt_tokens, s.output_tokens, s.concurrency) for s in samples]
    a = _fit(np.array([_ttft_features(*x) for x in shape]), np.array([s.ttft_s for s in samples]))
    b = _fit(np.array([_tpot_features(*x) for x in shape]), np.array([s.tpot_s for s in samples]))
    return {**dict(zip(TTFT_TERMS, map(float, a))), **dict(zip(TPOT_TERMS, map(float, b)))}


def fit_error(coef: dict[str, float], samples) -> dict[str, float]:
    """Mean absolute relative error of the model on `samples` (TTFT, TPOT, end to end): how far to trust it."""
    errs = {"ttft": [], "tpot": [], "e2e": []}
    for s in samples:
        pred = predict(coef, s.prompt_tokens, s.output_tokens, s.concurrency)
        for key in errs:
            measured = getattr(s, f"{key}_s")
            errs[key].append(abs(getattr(pred, f"{key}_s") - measured) / max(measured, 1e-9))
    return {key: float(np.mean(v)) for key, v in errs.items()}


def predict(coef: dict[str, float], prompt_tokens: int, output_tokens: int, concurrency: float = 1) -> LatencyPrediction:
    p, o, c = float(prompt_tokens), float(output_tokens), max(1.0, float(concurrency))
    ttft = float(np.dot([coef.get(k, 0.0) for k in TTFT_TERMS], _ttft_features(p, o, c)))
    tpot = float(np.dot([coef.get(k, 0.0) for k in TPOT_TERMS], _tpot_features(p, o, c)))
    return LatencyPrediction(ttft, tpot, ttft + tpot * max(0.0, o - 1))


def predict_latency(record, device_class: str, prompt_tokens: int, output_tokens: int, concurrency: float = 1,
                    devices: dict | None = None) -> LatencyPrediction | None:
    """The registry's prediction for a member on a device class: from its measured profile there, else
    from a profile predicted from the device's bandwidth (`record.profile`: the registry's measured
    `devices`, else the published table); None on a device class that is neither."""
    profile = record.profile(device_class, devices)
    if profile is None or not profile.latency_model:
        return None
    return predict(profile.latency_model, prompt_tokens, output_tokens, concurrency)
