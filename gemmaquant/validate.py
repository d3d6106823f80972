"""Checks at the front door: every input is checked before any work is done, and a bad one ends in a typed
`GemmaquantError` naming the file, the tensor or the option at fault.

    check_fields(recipe, RecipeError, recipe_ranges())   dataclass values: their annotated types, then their ranges
    check_float_checkpoint(ckpt)                         names, shapes and dtypes of a float checkpoint vs its config
    check_count(n_seq, "--n-seq", minimum=1)             a CLI number

Range tables are data: `{field: (predicate, "what it must be")}`; a float field must also be finite.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from gemmaquant.errors import UsageError


# ---- text files -------------------------------------------------------------------------------------------------
def read_utf8(path, error: type[Exception], what: str, missing: str = "not found") -> str:
    """The UTF-8 text of `path`; `error` naming the file when it is missing, unreadable or not UTF-8."""
    try:
        return open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the {what} as UTF-8") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror})") from None


# ---- dataclass values ---------------------------------------------------------------------------------------
def _type_ok(value, hint) -> bool:
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin in (tuple, list):
        item = typing.get_args(hint)[0]
        return isinstance(value, (tuple, list)) and all(_type_ok(v, item) for v in value)
    return True


def _type_name(hint) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return str(hint)


def check_fields(obj, error: type[Exception], ranges: dict | None = None) -> None:
    """Raise `error` naming the first field of dataclass `obj` whose value is not of its annotated type, is a
    non-finite float, or fails its entry in `ranges`. Integers given for float fields are stored as floats."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if not _type_ok(v, hints[f.name]):
            raise error(f"{f.name} = {v!r}: must be {_type_name(hints[f.name])}")
        if isinstance(v, float) and not math.isfinite(v):
            raise error(f"{f.name} = {v!r}: must be a finite number")
        if type(v) is int and _allows(hints[f.name], float) and not _allows(hints[f.name], int):
            object.__setattr__(obj, f.name, float(v))
    for name, (ok, what) in (ranges or {}).items():
        v = getattr(obj, name)
        if v is not None and not ok(v):
            raise error(f"{name} = {v!r}: must be {what}")


def _allows(hint, t) -> bool:
    return hint is t or t in typing.get_args(hint)


def positive(what: str = "> 0"):
    return (lambda v: v > 0, what)


def at_least(lo, what: str | None = None):
    return (lambda v: v >= lo, what or f">= {lo}")


def between(lo, hi, what: str | None = None):
    return (lambda v: lo <= v <= hi, what or f"in [{lo}, {hi}]")


def one_of(valid, what: str | None = None):
    valid = tuple(valid)
    return (lambda v: v in valid, what or f"one of {', '.join(map(str, valid))}")


# ---- CLI numbers --------------------------------------------------------------------------------------------
def check_count(value, option: str, minimum: int = 1, maximum: int | None = None, why: str = "") -> None:
    """An integer option (steps, tokens, sequences, ...) within [minimum, maximum]; UsageError naming it."""
    name = f"{option} / {option.lstrip('-').replace('-', '_')} = {value!r}"  # the CLI's and the library's name
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{name}: must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}{why}" if maximum is not None else ""
        raise UsageError(f"{name}: must be at least {minimum}{upper}")


# ---- checkpoints --------------------------------------------------------------------------------------------
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


def check_float_checkpoint(ckpt) -> None:
    """Every text tensor a float checkpoint must hold for its config is there, with the config's shape and a float
    dtype, and no other is: from the safetensors headers alone, before any tensor is read."""
    from gemmaquant.checkpoint import CheckpointError, expected_shapes

    want = expected_shapes(ckpt.config)
    have = ckpt.text_names()
    have_set = set(have)
    missing = [n for n in want if n not in have_set]
    if missing:
        raise CheckpointError(f"{ckpt.path}: tensor {ckpt.full_name(missing[0])!r} missing "
                              f"({len(missing)} missing in all; config.json says {ckpt.config.num_hidden_layers} "
                              f"layers, hidden size {ckpt.config.hidden_size})")
    unexpected = [n for n in have if n not in want]
    if unexpected:
        raise CheckpointError(f"{ckpt.path}: unexpected tensor {ckpt.full_name(unexpected[0])!r} for this config "
                              f"({len(unexpected)} in all)")
    for name, shape in want.items():
        file = ckpt.path / ckpt.weight_map[ckpt.full_name(name)]
        got = ckpt.shape(name)
        if got != shape:
            raise CheckpointError(f"{file}: tensor {ckpt.full_name(name)!r} has shape {list(got)}, expected "
                                  f"{list(shape)} from config.json")
        dtype = str(ckpt.dtype(name)).removeprefix("torch.")
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{file}: tensor {ckpt.full_name(name)!r} is {dtype}, not a float type (a float "
                                  f"checkpoint must hold float weights; a quantized one is read by its own loader)")


def all_finite(t) -> bool:
    """No NaN or Inf in t. One read-only pass: a sum is finite when every term is (NaN and Inf propagate); only
    a sum that overflowed, or a tensor that does hold NaN / Inf, is checked element by element."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32 if t.element_size() < 4 else None))):
        return True
    return bool(torch.isfinite(t).all())


def require_finite(t, name: str, where, error: type[Exception]) -> None:
    """A float tensor without NaN or Inf."""
    if t.is_floating_point() and not all_finite(t):
        raise error(f"{where}: tensor {name!r} contains NaN or Inf")


def check_float_values(ckpt) -> None:
    """Every text tensor of a float checkpoint is free of NaN and Inf: one read of the whole checkpoint, a tensor
    at a time (at disk speed, a minute for the 31B), so a quantization never starts on weights it cannot use."""
    from gemmaquant.checkpoint import CheckpointError

    for name in ckpt.text_names():
        full = ckpt.full_name(name)
        require_finite(ckpt.get(name), full, ckpt.path / ckpt.weight_map[full], CheckpointError)
