"""Quantization-aware training on gemmaquant's exact grids: library calls for fine-tuning pipelines, and a recipe.

    from gemmaquant.qat import prepare_qat, convert, export_source
    prepare_qat(model, "int4_g32_sym", learnable_scales=True)   # in place: fake quantization, STE, LSQ scales
    ... train as usual (transformers Trainer, PEFT LoRA, a plain torch loop); state_dict keeps checkpoint names
    packed = convert(model)                                      # in place: dequantized weights + Packed values
    export_gguf(export_source(model, tokenizer_dir=ckpt), "model-Q4_0.gguf", type="Q4_0")

    qat_train("tiny-moe", bits=4, data="train.txt", steps=200, out="out/")   # GPTQ start + KL distillation

fake_quant.py: the fake quantizer (forward = the format's own quantize/dequantize, STE / LSQ backward);
prepare.py: prepare_qat / convert on gemmaquant's Gemma4, transformers' Gemma 4 classes and PEFT wrappers;
source.py: a converted model as a tensor source for the exporters; train.py: the distillation recipe, with its
loss in distill.py and its moving average and resumable checkpoint in state.py.
See docs/qat.md.
"""

from gemmaquant.qat.fake_quant import FakeQuant, fake_quantize
from gemmaquant.qat.prepare import (QATError, checkpoint_name, convert, fake_quantizers, latent_weights, prepare_qat,
                                    qat_plan, scale_parameters)
from gemmaquant.qat.source import ModelSource, dequantized_model, export_source, write_work_dir
from gemmaquant.qat.distill import distill_loss
from gemmaquant.qat.state import WeightAverage
from gemmaquant.qat.train import BITS_FORMAT, QATRecipe, qat_train

__all__ = ["prepare_qat", "convert", "export_source", "qat_train", "QATRecipe", "QATError", "fake_quantize",
           "FakeQuant", "fake_quantizers", "scale_parameters", "latent_weights", "qat_plan", "checkpoint_name",
           "ModelSource", "write_work_dir", "dequantized_model", "distill_loss", "BITS_FORMAT", "WeightAverage"]
