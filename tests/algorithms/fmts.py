"""The formats the algorithm tests run on, by short name."""

from tests.algorithms.standin import Channel8, IntGroup, KQuant, Q40

FORMATS = {
    "int4_g32": lambda: IntGroup(4, 32),
    "int4_g128": lambda: IntGroup(4, 128),
    "int4_g32_sym": lambda: IntGroup(4, 32, True),
    "int3_g32": lambda: IntGroup(3, 32),
    "Q4_K": lambda: KQuant(),
    "Q4_0": lambda: Q40(),
    "int8_channel": lambda: Channel8(),
}
GPTQ_VS_RTN = ["int4_g32", "int4_g128", "int3_g32", "Q4_K"]  # formats whose GPTQ/RTN error ratio is asserted


def fmt(name: str):
    return FORMATS[name]()
