"""Int4Lattice: the int4 group-32 grid of a QAT checkpoint, w = d * q with q in [-8, 7] (all 16 codes).

It is Int4Group(32) (bf16 scales, symmetric) except that the code -8 is part of the grid, as it is in Q4_0
(w = d * (u - 8), u in [0, 15]) and in compressed-tensors' signed int4 (pack_to_int32 stores q + 8): a QAT
lattice uses it, so a matrix read back from one keeps it.

Packed layout: exactly Int4Group's (qdata uint8 [N, K // 2], low nibble = even k, u = q + 8; scale bf16
[N, K // 32]); compressed-tensors W4A16 g32 exports it as it is. As a GGUF block type it is Q4_0 with
d = fp16(scale): exact when the bf16 scale is an fp16 value (every scale >= 2^-17; see
gemmaquant.algorithms.lattice for the rare smaller ones, which the quantizer's report counts).

fit(w): per group the recovered lattice step where the group is on the lattice (gemmaquant.algorithms.lattice),
elsewhere Int4Group's own fit (absmax / 7, or the importance-weighted search), so RTN on this format keeps
every recovered group's codes and re-rounds only the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch import Tensor

from gemmaquant.formats.base import Packed
from gemmaquant.formats.int_group import IntGroup


@dataclass(frozen=True)
class Int4Lattice(IntGroup):
    bits_per_code: int = 4
    group_size: int = 32
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        super().__post_init__()
        if (self.bits_per_code, self.group_size, self.symmetric, self.scale_dtype) != (4, 32, True, torch.bfloat16):
            raise ValueError("Int4Lattice is int4, groups of 32, symmetric, bf16 scales (the QAT lattice)")

    name = property(lambda self: "int4_g32_lattice")
    ggml_type = property(lambda self: gguf.GGMLQuantizationType.Q4_0)

    def fit(self, w: Tensor, importance: Tensor | None = None) -> dict:
        from gemmaquant.algorithms.lattice import recover_lattice

        own = super().fit(w, importance)["scale"]
        lat = recover_lattice(w)
        return {"scale": torch.where(lat.exact, lat.step.to(own.device), own)}

    def grid(self, params: dict):
        return params["scale"].float(), torch.zeros_like(params["scale"], dtype=torch.float32), -8, 7

    # ---- ggml block bytes: Q4_0 ----
    def to_gguf_bytes(self, p: Packed) -> np.ndarray:
        """Q4_0 blocks: d = fp16(scale) | qs[16], byte j = u[j] | u[j + 16] << 4 (ggml block_q4_0)."""
        N, K = p.shape
        G = K // 32
        d = p.data["scale"].to(torch.float16).cpu().numpy().reshape(N, G, 1).view(np.uint8)
        u = (self.codes(p) + 8).to(torch.uint8).cpu().numpy().reshape(N, G, 32)
        return np.concatenate([d, u[..., :16] | (u[..., 16:] << 4)], axis=-1).reshape(N, G * 18)


INT4_LATTICE = Int4Lattice()
