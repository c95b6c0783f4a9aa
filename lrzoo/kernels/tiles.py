"""The production tilings of the Triton kernels, as plain data (no triton import).

One source for three readers: the kernels (``triton_common`` builds its autotune configs and prune
hook from :func:`fused_mm_tiles`; ``triton_randlora``/``triton_tera`` launch with the fixed tiles), the
ahead-of-time check (:mod:`lrzoo.kernels.aot_check` compiles what the autotuner may pick on each
target) and the roofline (:mod:`lrzoo.kernels.roofline` models each program's reads from these tiles).

Every tile here compiles for sm_80 and sm_90a without spilling and within the per-block shared memory
of A100 and H100, for every call the launchers make (``make kernels-check``; results in docs/kernels.md).
The lists are what that check left of the first version's five configs and of the candidates tried:

* fp32 runs an IEEE dot on the CUDA cores (no tensor cores, no TF32): the accumulator and both operand
  tiles live in registers. The half-precision tiles spilled there (128×128×64/8 warps: 255 registers
  and 2–3 KB of spills on sm_80; 128×256×64: 196,608 B of shared memory, over A100's 166,912 B), so
  fp32 has its own, smaller tiles.
* 128×256×64 (8 warps) spilled in fp16/bf16 too (two 128×256 fp32 accumulators when the low-rank term
  is on: 255 registers, 0.8–9 KB of spills on both targets): dropped.
* A call that rebuilds a dropout mask on its tiles gets smaller tiles (the lists below say which spilled).
* The RandLoRA and TeRA merge and ∂λ/∂γ kernels compute in IEEE fp32 whatever the activation dtype;
  their former 64×128 tiles with 4 warps spilled 11–13 KB on both targets (ptxas fell back to 32
  registers), so they use 8 warps and a shorter inner chunk.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tile:
    """One autotune config of the fused GEMM: the output tile, the K step, warps and pipeline stages."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int

    @property
    def blocks(self) -> dict:
        return {"BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N, "BLOCK_K": self.BLOCK_K}

    def label(self) -> str:
        return f"{self.BLOCK_M}×{self.BLOCK_N}×{self.BLOCK_K}/w{self.num_warps}/s{self.num_stages}"


#: fp16/bf16 (tensor cores, fp32 accumulation), both targets.
FUSED_MM_HALF = (
    Tile(128, 128, 64, 8, 3),
    Tile(64, 128, 64, 4, 4),
    Tile(128, 64, 32, 4, 4),
    Tile(64, 32, 128, 4, 3),
)
#: fp16/bf16 when a dropout mask is rebuilt on a tile (MASK_X, MASK_W, MASK_LR): Philox and its 64-bit element
#: offsets for a whole tile sit beside the accumulators. With the low-rank term masked (∂x under dropout),
#: 128×128×64/8 warps and 128×64×32/4 warps spilled on both targets (4–52 B on sm_80, ~1 KB on sm_90), and
#: 64×64×64 spilled masking x on sm_80 (8 B).
FUSED_MM_HALF_MASKED_SM80 = (
    Tile(64, 32, 128, 4, 3),
)
FUSED_MM_HALF_MASKED_SM90 = (
    Tile(64, 64, 64, 4, 3),
    Tile(64, 32, 128, 4, 3),
)
#: fp32 (IEEE dot on the CUDA cores, operand tiles in registers), both targets; the fused GEMM also takes the
#: low-rank term 16 columns at a time in fp32 (BLOCK_R = 16: 64-wide operand tiles spilled with every tile).
#: 64×64×32/4 warps and 64×128×32/8 warps spilled for some call (12–640 B), 128×64×32/8 warps for none.
FUSED_MM_FP32 = (
    Tile(128, 64, 32, 8, 3),
)
#: fp32 with a dropout mask: every tile above spilled masking the transposed x of ∂A (MASK_W, ~600 B), and
#: 32×64×32 and 64×64×16 spilled elsewhere (12–24 B).
FUSED_MM_FP32_MASKED = (
    Tile(32, 32, 32, 4, 3),
)


def fused_mm_tiles(capability: int, fp32: bool, masked: bool = False) -> tuple[Tile, ...]:
    """The tiles the fused GEMM's autotuner may pick on a device of ``capability`` (``major*10+minor``) for an fp32
    (IEEE) or a half-precision dot, ``masked`` when the call rebuilds a dropout mask on a tile. A device between the
    checked ones takes the list of the checked one below it (sm_86/sm_89: sm_80's)."""
    if fp32:
        return FUSED_MM_FP32_MASKED if masked else FUSED_MM_FP32
    if masked:
        return FUSED_MM_HALF_MASKED_SM90 if capability >= 90 else FUSED_MM_HALF_MASKED_SM80
    return FUSED_MM_HALF


def all_fused_mm_tiles() -> tuple[Tile, ...]:
    """Every tile of any call: the autotuner's config list, pruned per call by :func:`fused_mm_tiles`."""
    return tuple(dict.fromkeys(FUSED_MM_HALF + FUSED_MM_HALF_MASKED_SM80 + FUSED_MM_HALF_MASKED_SM90 + FUSED_MM_FP32
                               + FUSED_MM_FP32_MASKED))


def fused_mm_block_r(rank: int, fp32: bool) -> int:
    """The low-rank term's K step: the rank's power of two within [16, 64] in half precision, 16 in fp32."""
    return 16 if fp32 else max(16, min(64, 1 << max(rank - 1, 0).bit_length()))


#: RandLoRA's merge kernel (W' = W + s·Bf·Af): a BLOCK_D×BLOCK_d tile of W', the P products in BLOCK_C chunks.
RANDLORA_MERGE = {"BLOCK_C": 16, "BLOCK_D": 64, "BLOCK_d": 64, "num_warps": 8}
#: RandLoRA's ∂λ/∂γ kernel: a BLOCK_C×BLOCK_d tile of ∂Af, the D rows of G in BLOCK_D chunks.
RANDLORA_DIAG = {"BLOCK_C": 32, "BLOCK_D": 32, "BLOCK_d": 128, "num_warps": 8}
#: TeRA's merge kernel (W' = W + s·T·Rcᵀ): a BLOCK_M×BLOCK_N tile of W', Q in BLOCK_Q chunks.
TERA_MERGE = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_Q": 32, "num_warps": 8}
