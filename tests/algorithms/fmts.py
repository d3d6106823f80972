"""The formats the algorithm tests run on."""

from gemmaquant.formats import FORMATS, get_format

ALL = list(FORMATS)  # every format: GPTQ must stay on each one's grid
GPTQ_VS_RTN = ["int4_g32_sym", "int4_g32_asym", "int4_g128_sym", "int4_g128_asym", "int3_g32_sym", "q4_0", "q4_k",
               "q6_k", "iq4_nl", "iq4_xs", "q3_k", "q2_k"]  # formats whose GPTQ/RTN and AWQ/RTN error ratios are asserted


def fmt(name: str):
    return get_format(name)
