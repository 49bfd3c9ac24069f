"""Analysis of runs: model FLOPs utilisation and scaling-law fits.

Scaling law (Chinchilla, Hoffmann et al. 2022, "approach 3"):

    L(N, D) = E + A / N^alpha + B / D^beta

fitted by minimising the Huber loss (delta = 1e-3) between log L and
log(exp(a - alpha log N) + exp(b - beta log D) + exp(e)) with L-BFGS from a grid of
starting points, A = exp(a), B = exp(b), E = exp(e). With training compute C ~ 6 N D
the loss-optimal split of a budget C is

    N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = (C/6)^(alpha/(alpha+beta)) / G,
    G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import itertools
import platform
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) of GPUs whose name contains the key.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def device_peak_flops(device: torch.device | str | None = None, *, probe_size: int = 1024) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained): the table for known GPUs; elsewhere a
    measured float32 matmul rate (a probe, so MFU on CPU is relative to what this
    machine's BLAS reaches, not a datasheet)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"table: {name} bf16 dense"
    a = torch.randn(probe_size, probe_size, device=device)
    a @ a  # warm up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * probe_size ** 3 / best, f"measured: fp32 {probe_size}^3 matmul on {device.type}"


def device_description() -> str:
    """One line naming the machine a measurement ran on (GPU name, or CPU model and threads)."""
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {model}, {torch.get_num_threads()} threads"


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of training: 3 x forward FLOPs (forward + backward)."""
    return 3 * flops_per_token * tokens_per_s / peak_flops


@dataclass
class ScalingFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    huber_loss: float

    def predict(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) minimising the predicted loss at training compute ``flops`` = 6 N D."""
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1 / (a + b))
        return G * (flops / 6) ** (b / (a + b)), (flops / 6) ** (a / (a + b)) / G

    def as_dict(self) -> dict:
        return asdict(self)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r ** 2, delta * (a - 0.5 * delta))


def fit_scaling_law(N: Sequence[float], D: Sequence[float], L: Sequence[float], *, delta: float = 1e-3,
                    grid: dict[str, Sequence[float]] | None = None) -> ScalingFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to observed (parameters, tokens, loss)."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    logN, logD, logL = (np.log(np.asarray(v, dtype=float)) for v in (N, D, L))
    if len(logL) < 5:
        raise ValueError(f"a scaling fit needs at least 5 runs (it has 5 parameters), got {len(logL)}")

    def objective(p):  # Huber loss and its gradient (analytic: L-BFGS needs hundreds of starts)
        a, b, e, alpha, beta = p
        terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
        pred = logsumexp(terms, axis=0)
        r = pred - logL
        dr = np.clip(r, -delta, delta)  # derivative of the Huber loss
        w = np.exp(terms - pred) * dr  # softmax weights of the three terms, times dH/dr
        grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * logN).sum(), -(w[1] * logD).sum()])
        return _huber(r, delta).sum(), grad

    grid = grid or {"a": [0, 5, 10, 20], "b": [0, 5, 10, 20], "e": [-1, 0, 1], "alpha": [0.2, 0.5, 1.0],
                    "beta": [0.2, 0.5, 1.0]}
    best = None
    for start in itertools.product(*grid.values()):
        res = minimize(objective, np.array(start, dtype=float), method="L-BFGS-B", jac=True)
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return ScalingFit(float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta),
                      float(best.fun))
