"""`gemmaquant` command line: each command parses its arguments and calls one library function (no logic here).

    gemmaquant quantize 26b-a4b --bits 4              # GGUF + compressed-tensors + report in ./26b-a4b-int4/
    gemmaquant quantize tiny-moe --bits 4 --dry-run   # the plan, sizes and estimates, before any work
    gemmaquant eval tiny-moe out/tiny-moe-int4/tiny-moe-Q4_0.gguf
    gemmaquant inspect out/tiny-moe-int4/tiny-moe-Q4_0.gguf
    gemmaquant variants
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Exact quantization of Gemma 4 to GGUF (llama.cpp) and compressed-tensors (vLLM).")


_debug = {"on": False}  # --debug, set for each invocation


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="on an error, show the full traceback")):
    """Exact quantization of Gemma 4 to GGUF (llama.cpp) and compressed-tensors (vLLM)."""
    _debug["on"] = debug


def _run(fn, *args, resumes: str | None = None, **kwargs):
    """Call the library; its errors end the command with one line (exit 2 for the user's errors, 1 for a bug).
    `resumes`: what running the same command again after Ctrl-C does, said on the way out (exit code 130)."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted" + (f"; run the same command again to resume {resumes}" if resumes else ""),
                   err=True)
        raise typer.Exit(130) from None
    except Exception as e:
        from gemmaquant.errors import describe

        if _debug["on"]:
            raise
        code, message = describe(e)
        typer.echo(message, err=True)
        raise typer.Exit(code) from None


def _emit(result: dict, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(result, indent=2, default=str) if as_json else text)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="alias (e2b, e4b, 26b-a4b, 31b, tiny-dense, tiny-moe, tiny-edge) or a "
                                "local checkpoint directory"),
    bits: int = typer.Option(4, help="4 or 8"),
    method: str = typer.Option("gptq", help="rtn | imatrix | gptq | awq"),
    format: str = typer.Option("gguf,safetensors", "--format", help="comma-separated: gguf, safetensors"),
    gguf_type: Optional[str] = typer.Option(None, help="GGUF type or mix (Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q3_K_M, IQ4_XS, "
                                            "IQ4_NL, Q2_K, ...): quantize onto llama.cpp's grids"),
    group_size: Optional[int] = typer.Option(None, help="int4 group size (32, 64, 128); GGUF export needs 32"),
    recipe: Optional[Path] = typer.Option(None, help="a recipe TOML file (overrides --bits/--method)"),
    calib: Optional[Path] = typer.Option(None, help="calibration text (.txt, blank-line separated) or .jsonl"),
    out: Optional[Path] = typer.Option(None, help="output directory (default ./<model>-<scheme>)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and estimates, do nothing"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output directory"),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="measure KL divergence etc. and write the report"),
    device: str = typer.Option("auto", "--device", help="auto (the first CUDA GPU, else the CPU), cpu, cuda, cuda:N"),
    activation_budget: Optional[float] = typer.Option(None, "--activation-budget", help="GiB of GPU memory the "
                                                      "calibration activations may hold (default: half the free "
                                                      "memory; beyond it they live in host memory; 0: always)"),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="choose by measured sensitivity, for "
                                               "this many bits per weight (file bytes), a type per tensor (--format "
                                               "gguf) or an int4/int8/bf16 scheme per layer (--format safetensors)"),
    target_size: Optional[float] = typer.Option(None, "--target-size", help="as --target-bpw, for a file "
                                                "of this many GiB"),
    gguf_mix: Optional[Path] = typer.Option(None, "--gguf-mix", help="GGUF: a mix file (JSON tensor -> type, "
                                            "as --target-bpw writes it) to quantize onto"),
    ct_mix: Optional[Path] = typer.Option(None, "--ct-mix", help="compressed-tensors: a per-layer mix file (JSON "
                                          "tensor -> scheme, as --format safetensors --target-bpw writes it)"),
    per_layer_experts: bool = typer.Option(False, "--per-layer-experts", help="compressed-tensors mix: each layer's "
                                           "experts their own scheme (vLLM loads it; transformers 5.x dequantizes "
                                           "all experts with one scheme, so by default they share one)"),
    from_qat: Optional[bool] = typer.Option(None, "--from-qat/--no-from-qat", help="read a QAT checkpoint's int4 "
                                            "lattice back instead of rounding it again (default: detected)"),
    pad_to_block: Optional[str] = typer.Option(None, "--pad-to-block", help="GGUF: zero-pad the MLP widths that "
                                               "are not multiples of 256 (all, or mlp / experts) so that ffn_down "
                                               "takes the K-quants (the same function; +9%% at 704 and 2112)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Quantize a Gemma 4 and write GGUF, compressed-tensors safetensors and a report."""
    from gemmaquant.workflow import run_quantize

    res = _run(run_quantize, model, bits=bits, method=method, formats=format, gguf_type=gguf_type,
               group_size=group_size, recipe_file=recipe, calib=calib, out=out, dry_run=dry_run,
               overwrite=overwrite, evaluate=evaluate, progress=None if not as_json else False,
               device=device, activation_budget_gib=activation_budget, target_bpw=target_bpw,
               target_size=target_size, gguf_mix=gguf_mix, from_qat=from_qat, pad_to_block=pad_to_block,
               ct_mix=ct_mix, per_layer_experts=per_layer_experts,
               resumes="after the last finished layer")
    _emit(res, as_json, res["text"])


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="the unquantized model (alias or directory)"),
    quantized: Path = typer.Argument(..., help="a GGUF file, compressed-tensors directory, or a `quantize "
                                   "--out` / `qat --out` directory (its safetensors run packed, else its GGUF)"),
    heldout: Optional[Path] = typer.Option(None, help="held-out text (default: the bundled held-out set)"),
    n_seq: int = typer.Option(16), seq_len: int = typer.Option(128),
    device: str = typer.Option("cpu", "--device", help="cpu (default), cuda, cuda:N, auto"),
    as_json: bool = typer.Option(False, "--json"),
):
    """KL divergence, top-1 agreement and perplexity of a quantized file against its float model."""
    from gemmaquant.workflow import run_eval

    res = _run(run_eval, model, quantized, heldout=heldout, n_seq=n_seq, seq_len=seq_len, device=device)
    _emit(res, as_json, res["text"])


@app.command()
def inspect(path: Path = typer.Argument(..., help="a GGUF file or a safetensors directory/file")):
    """Tensor types, sizes, bits per weight and metadata of a file gemmaquant or llama.cpp wrote."""
    from gemmaquant.export.inspect import inspect_file

    typer.echo(_run(inspect_file, path))


@app.command()
def bench(
    model: str = typer.Argument(..., help="alias, checkpoint directory, GGUF file, compressed-tensors "
                                "directory, or a `quantize --out` / `qat --out` directory (its safetensors run "
                                "packed, through gemmaquant.ops, else its GGUF)"),
    prompt_len: int = typer.Option(128), new_tokens: int = typer.Option(32),
    device: str = typer.Option("auto", "--device", help="auto (the first CUDA GPU, else the CPU), cpu, cuda, cuda:N"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Prefill and decode tokens/s of a model on this machine's device."""
    from gemmaquant.workflow import run_bench

    res = _run(run_bench, model, prompt_len=prompt_len, new_tokens=new_tokens, device=device)
    _emit(res, as_json, res["text"])


@app.command()
def variants(as_json: bool = typer.Option(False, "--json")):
    """The Gemma 4 variants gemmaquant knows, with parameter counts (computed without weights)."""
    from gemmaquant.workflow import list_variants

    res = list_variants()
    _emit(res, as_json, res["text"])


@app.command()
def qat(
    model: str = typer.Argument(...),
    bits: Optional[int] = typer.Option(None, help="4 (default), 3, 2 or 8; --format / --gguf-type name the grid "
                                                 "instead"),
    data: Path = typer.Option(..., help="training text"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: from the amount of text, 400 to 1000; "
                                                   "docs/qat.md)"),
    out: Path = typer.Option(...),
    heldout: Optional[Path] = typer.Option(None, help="held-out text for choosing the exported state and for the "
                                           "report (default: the last 10% of --data, not trained on)"),
    export_last: bool = typer.Option(False, "--export-last", help="export the last state even where an earlier "
                                     "one (or the GPTQ start) does better on the held-out text"),
    seed: Optional[int] = typer.Option(None, help="seed of the training batches (default 0)"),
    lr: Optional[float] = typer.Option(None, help="latent-weight rate in grid steps per step (default 0.0025); 0 "
                                                  "keeps GPTQ's weights and trains the scales (docs/qat.md)"),
    scale_lr: Optional[float] = typer.Option(None, help="block-scale rate in grid steps per step (default 0.00075)"),
    expert_lr_scale: Optional[float] = typer.Option(None, help="MoE: the experts' rates relative to --lr and "
                                                    "--scale-lr (default 4)"),
    attention_lr_scale: Optional[float] = typer.Option(None, help="the attention matrices' rates relative to "
                                                       "--lr and --scale-lr (default: 0.25 on an MoE model, 1 "
                                                       "otherwise)"),
    batch_size: Optional[int] = typer.Option(None, help="sequences per step (default: 32 on an MoE model, "
                                             "8 otherwise)"),
    micro_batch: Optional[int] = typer.Option(None, help="sequences per forward/backward: gradient accumulation "
                                              "over the step's batch_size, for less activation memory"),
    weight_format: Optional[str] = typer.Option(None, "--format", help="train on this format's grid instead of "
                                                "--bits' default, e.g. q4_0 (llama.cpp's Q4_0; GGUF export only)"),
    gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="train every weight on the block type this "
                                            "llama.cpp mix gives it (Q4_K_M, Q5_K_M, ...); exports that GGUF "
                                            "exactly (instead of --bits / --format)"),
    embedding_type: Optional[str] = typer.Option(None, "--embedding-type", help="train the embedding tables on "
                                                 "this GGUF type and store them so in the GGUF (llama-quantize's "
                                                 "--token-embedding-type; llama.cpp's default is Q6_K)"),
    per_layer_embed_lr: Optional[float] = typer.Option(None, help="E2B / E4B: the per-layer embedding tables' "
                                                       "rate (default: the embeddings'); 0 freezes them and "
                                                       "shares them with the teacher (about half the memory)"),
    average: Optional[float] = typer.Option(None, help="decay of the moving average of the trained values "
                                            "that is exported (default 0.99; 0 exports the last step)"),
    learnable_ints: Optional[bool] = typer.Option(None, "--learnable-ints/--fixed-ints", help="train the "
                                                  "K-quants' 6-bit sub-block scales and mins too (default) or "
                                                  "keep GPTQ's"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    device: str = typer.Option("auto", "--device", help="auto (the first CUDA GPU, else the CPU), cpu, cuda, cuda:N: "
                               "where the float model, the trained model and the training live"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Quantization-aware training (distillation from the float model, from GPTQ weights), then export."""
    from gemmaquant.workflow import run_qat

    res = _run(run_qat, model, bits=bits, data=data, steps=steps, out=out, overwrite=overwrite, device=device,
               heldout=heldout, export_last=export_last, seed=seed, lr=lr,
               scale_lr=scale_lr, expert_lr_scale=expert_lr_scale, attention_lr_scale=attention_lr_scale,
               batch_size=batch_size, micro_batch=micro_batch,
               weight_format=weight_format, gguf_type=gguf_type, embedding_type=embedding_type, average=average,
               learnable_ints=learnable_ints, per_layer_embed_lr=per_layer_embed_lr,
               resumes="from the last saved step")
    _emit(res, as_json, res["text"])


def main():  # pragma: no cover
    app(prog_name="gemmaquant")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
