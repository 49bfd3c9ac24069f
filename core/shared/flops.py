"""Model FLOPs utilisation: the device's peak and the share of it a run uses. (The
scaling-law fit of a sweep is in ``llmzoo_plugins.report``.)"""

from __future__ import annotations

import platform
import time

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
