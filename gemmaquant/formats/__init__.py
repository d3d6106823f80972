"""Quantization formats: what the bits are. One small class per format, its packed layout in its docstring.

FORMATS maps the stable names used in recipes, reports and docs/formats.md to format instances (one literal
dict, no registry); `get_format(name)` looks one up. Other configurations are built directly, e.g.
IntGroup(3, 128, symmetric=False) or Int8Channel(scale_dtype=torch.float16).
"""

from gemmaquant.formats.base import Packed, QuantFormat
from gemmaquant.formats.gguf_iquants import IQ4, IQ4_NL, IQ4_XS
from gemmaquant.formats.gguf_kquants import Q4_K, Q5_K, Q6_K, KQuant
from gemmaquant.formats.gguf_lowbit import Q2_K, Q2K, Q3_K, Q3K
from gemmaquant.formats.gguf_legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, GGUFLegacy
from gemmaquant.formats.int4_lattice import Int4Lattice
from gemmaquant.formats.int8_channel import Int8Channel
from gemmaquant.formats.int_group import Int4Group, IntGroup

FORMATS = {
    "int8": Int8Channel(),
    "int4_g32_sym": Int4Group(32), "int4_g64_sym": Int4Group(64), "int4_g128_sym": Int4Group(128),
    "int4_g32_asym": Int4Group(32, False), "int4_g64_asym": Int4Group(64, False),
    "int4_g128_asym": Int4Group(128, False),
    "int3_g32_sym": IntGroup(3, 32), "int3_g32_asym": IntGroup(3, 32, False),
    "int2_g32_sym": IntGroup(2, 32), "int2_g32_asym": IntGroup(2, 32, False),
    "int4_g32_lattice": Int4Lattice(),  # a QAT checkpoint's own lattice, read back (algorithms/lattice.py)
    "q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1, "q5_0": Q5_0, "q5_1": Q5_1, "q4_k": Q4_K, "q5_k": Q5_K, "q6_k": Q6_K,
    "iq4_nl": IQ4_NL, "iq4_xs": IQ4_XS, "q3_k": Q3_K, "q2_k": Q2_K,
}


def get_format(name: str) -> QuantFormat:
    """The format called `name` (case-insensitive) in FORMATS; KeyError listing the valid names otherwise."""
    key = name.lower()
    if key not in FORMATS:
        raise KeyError(f"unknown format {name!r}; valid: {', '.join(FORMATS)}")
    return FORMATS[key]


__all__ = ["Packed", "QuantFormat", "FORMATS", "get_format", "IntGroup", "Int4Group", "Int8Channel", "GGUFLegacy",
           "Int4Lattice", "KQuant", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "IQ4", "IQ4_NL",
           "IQ4_XS", "Q3K", "Q3_K", "Q2K", "Q2_K"]
