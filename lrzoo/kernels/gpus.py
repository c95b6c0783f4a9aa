"""The GPUs the kernels are checked and modelled for: per-block and per-SM limits, published peaks.

Limits are NVIDIA's "Technical Specifications per Compute Capability" table (CUDA C++ Programming
Guide): compute capability 8.0 (A100) and 9.0 (H100). Peaks are the dense (no sparsity) figures of
NVIDIA's datasheets: "NVIDIA A100 Tensor Core GPU" (A100 80GB SXM: 2,039 GB/s HBM2e, 312 TFLOP/s
FP16/BF16 tensor, 156 TF32 tensor, 19.5 FP32) and "NVIDIA H100 Tensor Core GPU" (H100 SXM: 3.35 TB/s
HBM3, 989 TFLOP/s FP16/BF16 tensor, 494.5 TF32 tensor, 67 FP32; the datasheet prints the sparse
figures 1,979 and 989 with "* with sparsity"; the dense ones are half). SM counts and L2 sizes are
from the same datasheets and NVIDIA's architecture whitepapers (A100: 108 SMs, 40 MB L2; H100 SXM:
132 SMs, 50 MB L2). No figure here was measured.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: int  # 80 for sm_80, 90 for sm_90(a)
    # per block / per SM limits
    smem_per_block_optin: int  # bytes, static + dynamic, after cudaFuncSetAttribute opt-in
    smem_per_sm: int
    smem_reserved_per_block: int  # the runtime keeps 1 KB of each block's shared memory
    regs_per_sm: int
    max_regs_per_thread: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    # published peaks (dense)
    sms: int
    l2_bytes: int
    hbm_bytes_per_s: float
    tensor_flops: dict  # dtype name -> FLOP/s of the tensor cores (fp16, bf16, tf32)
    fp32_flops: float  # CUDA-core FP32 (an IEEE fp32 dot: our fp32 path and torch's default fp32 matmul)

    @property
    def target(self) -> str:
        return f"sm_{self.capability}"

    def matmul_flops(self, dtype: str) -> float:
        """Peak FLOP/s of a matmul in ``dtype`` ("fp16", "bf16", "fp32"): fp32 is IEEE (no TF32) on both sides,
        as lrzoo's kernels (``input_precision="ieee"``) and torch's default (``allow_tf32=False``) compute it."""
        return self.fp32_flops if dtype == "fp32" else self.tensor_flops[dtype]


A100 = Gpu(name="A100 SXM 80GB", capability=80, smem_per_block_optin=166_912, smem_per_sm=167_936,
           smem_reserved_per_block=1024, regs_per_sm=65_536, max_regs_per_thread=255, max_warps_per_sm=64,
           max_blocks_per_sm=32, sms=108, l2_bytes=40 * 1024**2, hbm_bytes_per_s=2.039e12,
           tensor_flops={"fp16": 312e12, "bf16": 312e12, "tf32": 156e12}, fp32_flops=19.5e12)
H100 = Gpu(name="H100 SXM", capability=90, smem_per_block_optin=232_448, smem_per_sm=233_472,
           smem_reserved_per_block=1024, regs_per_sm=65_536, max_regs_per_thread=255, max_warps_per_sm=64,
           max_blocks_per_sm=32, sms=132, l2_bytes=50 * 1024**2, hbm_bytes_per_s=3.35e12,
           tensor_flops={"fp16": 989e12, "bf16": 989e12, "tf32": 494.5e12}, fp32_flops=67e12)
GPUS = {gpu.target: gpu for gpu in (A100, H100)}


def gpu_for_capability(capability: int) -> Gpu:
    """The modelled GPU of a compute capability (``major * 10 + minor``); the nearest lower one for others
    (an sm_86/sm_89 part is checked against A100's limits, which are the larger ones it could have)."""
    known = sorted(GPUS.values(), key=lambda g: g.capability)
    fitting = [g for g in known if g.capability <= capability]
    return fitting[-1] if fitting else known[0]


def blocks_per_sm(gpu: Gpu, regs_per_thread: int, shared_bytes: int, num_warps: int) -> tuple[int, str]:
    """Resident blocks per SM and what limits them ("registers", "shared memory", "warps", "blocks").

    Registers are allocated per warp in units of 256 (8 per thread); each block also takes the reserved
    1 KB of shared memory. ``shared_bytes`` is static + dynamic per block.
    """
    regs_per_warp = -(-max(regs_per_thread, 1) * 32 // 256) * 256
    limits = {
        "registers": (gpu.regs_per_sm // regs_per_warp) // num_warps,
        "shared memory": gpu.smem_per_sm // (shared_bytes + gpu.smem_reserved_per_block),
        "warps": gpu.max_warps_per_sm // num_warps,
        "blocks": gpu.max_blocks_per_sm,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter
