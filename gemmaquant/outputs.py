"""The model a `gemmaquant quantize --out` or `gemmaquant qat --out` directory holds, for `eval` and `bench`.

The command line prunes a finished quantization's work directory to its records (no weights), so an output
directory holds the exports and the report. `exported_model(dir)` picks what to run, in this order:

    quantized/          QAT's result in the work-directory layout (the exact trained values; runs packed)
    .gemmaquant-work/   an unfinished quantization, or one the library wrote (`gemmaquant.quantize`)
    safetensors/        the compressed-tensors export (runs packed, through gemmaquant.ops)
    <name>-<type>.gguf  the GGUF export (runs dequantized), when it is the only one

Anything else (an alias, a GGUF file, a checkpoint or compressed-tensors directory) is returned as it is.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from gemmaquant.hub import ModelNotFound


def exported_model(path: str | os.PathLike) -> str | Path:
    """`path`, or the model inside it when it is a quantize / qat output directory (see the module docstring)."""
    from gemmaquant.runtime import work_dir_of

    p = Path(path)
    if not p.is_dir() or (p / "config.json").is_file():
        return path
    if work_dir_of(p / "quantized") is not None:  # before the work directory: in a QAT output that is GPTQ's start
        return p / "quantized"
    if work_dir_of(p) is not None:
        return p
    if (p / "safetensors" / "config.json").is_file():
        return p / "safetensors"
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise ModelNotFound(f"{p}: holds {len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs)}); "
                            f"name the one to run")
    raise ModelNotFound(f"{p}: no model here: no config.json, no safetensors/ export, no .gguf file and no "
                        f"quantizer work directory (is it a `gemmaquant quantize --out` directory?)")


@contextmanager
def removed_if_left_empty(out: str | os.PathLike):
    """Around a command that creates the output directory `out`: when the command fails and `out` did not exist
    before and is still empty (nothing to resume; e.g. the weights were not found), `out` is removed again."""
    out = Path(out)
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
