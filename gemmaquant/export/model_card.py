"""README.md for a compressed-tensors export: how to load it, written into the directory itself.

Hugging Face users read a checkpoint's README before loading it, and an MoE export needs one thing they would not
guess: transformers (5.25) has no conversion that merges per-expert quantized weights into Gemma 4's fused expert
parameters, so a plain `from_pretrained` leaves the experts random with only a load-report warning (issue 27).
The card says to use `gemmaquant.export.load_transformers`, which adds the merge for that call and raises when a
weight was not loaded. Nothing else in the card is needed to load the files: vLLM reads config.json.
"""

from __future__ import annotations

from pathlib import Path


def _schemes(qcfg: dict) -> list[str]:
    out = []
    for name, group in qcfg.get("config_groups", {}).items():
        w = group.get("weights") or {}
        how = f"group of {w['group_size']}" if w.get("strategy") == "group" else f"per {w.get('strategy')}"
        out.append(f"`{name}`: int{w.get('num_bits')} {'symmetric' if w.get('symmetric') else 'asymmetric'}, "
                   f"{how}, targets {', '.join(f'`{t}`' for t in group.get('targets', []))}")
    return out


def model_card(config: dict, name: str) -> str:
    text = config.get("text_config", config)
    moe = bool(text.get("enable_moe_block"))
    qcfg = config.get("quantization_config", {})
    lines = [f"# {name}: Gemma 4, quantized", "",
             "Quantized by gemmaquant: compressed-tensors "
             f"`{qcfg.get('format', 'pack-quantized')}` weights, activations in the model dtype "
             f"(`{config.get('torch_dtype', 'bfloat16')}`).", ""]
    lines += [f"- {s}" for s in _schemes(qcfg)]
    lines += [f"- kept unquantized: {', '.join(f'`{i}`' for i in qcfg.get('ignore', []))}", "",
              "## Load it", "", "`DIR` is this directory. vLLM / SGLang read `config.json` as is:", "", "```", "vllm serve DIR", "```", ""]
    if moe:
        lines += ["**transformers: use gemmaquant's loader.** The experts are stored one quantized matrix per "
                  "expert (the layout vLLM needs); transformers cannot merge those into Gemma 4's fused expert "
                  "parameters on its own, and a plain `AutoModelForCausalLM.from_pretrained(DIR)` leaves the "
                  "experts **randomly initialised** with only a warning in its load report:", "",
                  "```python", "from gemmaquant.export import load_transformers",
                  "model = load_transformers(DIR, dtype=torch.bfloat16)   # raises if any weight is not loaded",
                  "```"]
    else:
        lines += ["transformers (with `compressed-tensors` installed):", "", "```python",
                  "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.bfloat16)", "```"]
    lines += ["", "gemmaquant reads it back too: `gemmaquant.load(DIR)` (our reference model on the dequantized "
              "weights), `gemmaquant inspect DIR`.", ""]
    return "\n".join(lines)


def write_model_card(out_dir: Path, config: dict, name: str) -> None:
    (Path(out_dir) / "README.md").write_text(model_card(config, name))
