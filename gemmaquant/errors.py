"""The one base class of every error gemmaquant raises for input it cannot use, and how the CLI reports errors.

    try:
        gemmaquant.quantize("path/to/checkpoint", "default/int4-gptq", out="out/")
    except gemmaquant.errors.GemmaquantError as e:     # CheckpointError, RecipeError, GGUFFormatError, ...
        print(e)                                        # names the file, the tensor or the option at fault

Each module keeps its own error class (`gemmaquant.checkpoint.CheckpointError`, `gemmaquant.recipe.RecipeError`,
...) under its old name; each derives from `GemmaquantError` and from the builtin it derived from before
(`ValueError`, `FileNotFoundError`), so existing `except ValueError` code keeps working. Any other exception
escaping gemmaquant is a bug, and the CLI says so (`describe`).
"""

from __future__ import annotations

import traceback

class GemmaquantError(Exception):
    """Input gemmaquant cannot use (a damaged file, an invalid option, a recipe value out of range, ...): the user's
    to fix. The message names the file, the tensor or the option at fault."""


class UsageError(GemmaquantError, ValueError):
    """Conflicting or invalid options (a CLI number out of range, two options that exclude each other, ...)."""


# OSErrors are the environment's, not a bug: a missing or unwritable path, a full disk.
USER_ERRORS = (GemmaquantError, OSError)


def describe(exc: BaseException) -> tuple[int, str]:
    """(exit code, message) for an exception that ended a command: 2 and one line for the user's errors, 1 and a
    request to report it for anything else (a bug), which names where it was raised but shows no traceback."""
    if isinstance(exc, USER_ERRORS):
        return 2, f"error: {exc}"
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, outside the quantize layers (which say more)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "CUDA out of memory"
        return 2, (f"error: out of device memory ({first[:160]}); lower the batch size or sequence length, or "
                   f"run on --device cpu; finished steps are kept and rerunning the same command resumes")
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {where.filename}:{where.lineno})" if where else ""
    return 1, (f"internal error: {type(exc).__name__}: {exc}{at}\n"
               f"This is a bug in gemmaquant, not a problem with your input. Please report it on the project's issue "
               f"tracker with the command line; `gemmaquant --debug ...` shows the full traceback.")
