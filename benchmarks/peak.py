"""This machine's matmul peak, fp32 and bf16: the denominator of MFU.

    python -m benchmarks.peak

On a CPU without native bf16 (AVX2 only: no AVX512-BF16, no AMX) one 1024^3
bf16 matmul takes over ten seconds, so bf16 is measured at n=512 (where it is,
if anything, faster per FLOP than at 1024 on such a CPU) after a single warm-up.
"""

from __future__ import annotations

import time


def matmul_flops(dtype_name: str, n: int = 1024, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of square n x n matmuls in the given dtype."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: one is enough, and emulated bf16 makes each one slow
    reps, start = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def main() -> dict:
    import torch

    peaks = {"float32": matmul_flops("float32", n=1024), "bfloat16": matmul_flops("bfloat16", n=512)}
    result = {
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fp32_gflops": round(peaks["float32"] / 1e9, 2),
        "bf16_gflops": round(peaks["bfloat16"] / 1e9, 3),
    }
    result["bf16_over_fp32"] = round(peaks["bfloat16"] / peaks["float32"], 3)
    return result


if __name__ == "__main__":
    from benchmarks.harness import save_results

    res = main()
    save_results("peak", res)
    print(res)
