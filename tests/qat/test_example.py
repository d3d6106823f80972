"""docs/qat-example.md runs as written (with fewer steps): QAT fine-tuning of a transformers model, a mid-training
save and resume, convert, GGUF + compressed-tensors export; then the Trainer + LoRA version."""

import importlib.util
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "qat-example.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def small(code: str) -> str:
    out, n = re.subn(r"^STEPS, BATCH, SEQ(.*?) = .*$", lambda m: f"STEPS, BATCH, SEQ{m.group(1)} = 4, 2, 64"
                     + (", 1e-5" if m.group(1) else ""), code, flags=re.M)
    assert n == 1, "the example's size line changed; update this test"
    return out


def test_plain_loop_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(small(blocks()[0]), str(DOC), "exec"), {"__name__": "example"})
    assert (tmp_path / "out/qat-example/model-Q4_0.gguf").is_file()
    assert (tmp_path / "out/qat-example/w4a16/config.json").is_file()
    assert (tmp_path / "out/qat-example/mid/model.safetensors").is_file()


@pytest.mark.skipif(not (importlib.util.find_spec("peft") and importlib.util.find_spec("accelerate")),
                    reason="needs peft and accelerate")
def test_trainer_lora_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(small(blocks()[1]), str(DOC), "exec"), {"__name__": "example"})
    assert (tmp_path / "out/qat-lora-example/model-Q4_0.gguf").is_file()
