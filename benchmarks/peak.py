"""This machine's matmul peak, fp32 and bf16: the denominator of MFU.

    python -m benchmarks.peak
"""

from __future__ import annotations

import time


def matmul_flops(dtype_name: str, n: int = 1024, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of square n x n matmuls in the given dtype."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def main() -> dict:
    import torch

    peaks = {name: matmul_flops(name) for name in ("float32", "bfloat16")}
    result = {
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fp32_gflops": round(peaks["float32"] / 1e9, 1),
        "bf16_gflops": round(peaks["bfloat16"] / 1e9, 1),
    }
    result["bf16_over_fp32"] = round(result["bf16_gflops"] / result["fp32_gflops"], 2)
    return result


if __name__ == "__main__":
    print(main())
