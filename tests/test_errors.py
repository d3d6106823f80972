"""One base class under every error gemmaquant raises for bad input, the old names and builtin bases kept, and the
CLI's one-line report of an error (exit 2) or of a bug (exit 1)."""

import pytest

import gemmaquant
from gemmaquant.calibration import CalibrationError
from gemmaquant.checkpoint import CheckpointError
from gemmaquant.config import ConfigError
from gemmaquant.errors import GemmaquantError, UsageError, describe
from gemmaquant.export.compressed_tensors_reader import CompressedTensorsError
from gemmaquant.export.errors import ExportError
from gemmaquant.export.gguf_mix import MixError
from gemmaquant.export.gguf_pack import PackError
from gemmaquant.export.gguf_reader import GGUFFormatError
from gemmaquant.export.gguf_vocab import VocabError
from gemmaquant.hub import ModelNotFound
from gemmaquant.qat import QATError
from gemmaquant.quantize import QuantizeError
from gemmaquant.recipe import RecipeError
from gemmaquant.workflow import UsageError as WorkflowUsageError

VALUE_ERRORS = [CalibrationError, CheckpointError, ConfigError, CompressedTensorsError, ExportError, MixError,
                PackError, GGUFFormatError, VocabError, QATError, QuantizeError, RecipeError, UsageError]


@pytest.mark.parametrize("cls", VALUE_ERRORS + [ModelNotFound], ids=lambda c: c.__name__)
def test_every_error_derives_from_the_base_and_keeps_its_builtin(cls):
    assert issubclass(cls, GemmaquantError)
    assert issubclass(cls, FileNotFoundError if cls is ModelNotFound else ValueError)  # `except ValueError` still works
    assert gemmaquant.GemmaquantError is GemmaquantError and WorkflowUsageError is UsageError


def test_describe_user_error_and_bug():
    assert describe(CheckpointError("ckpt/model.safetensors: truncated")) == \
        (2, "error: ckpt/model.safetensors: truncated")
    assert describe(PermissionError(13, "Permission denied", "out/x.gguf"))[0] == 2
    try:
        {}["key"]
    except KeyError as e:
        code, msg = describe(e)
    assert code == 1 and msg.startswith("internal error: KeyError: 'key' (at ") and "test_errors.py" in msg
    assert "bug in gemmaquant" in msg and "--debug" in msg and "Traceback" not in msg
