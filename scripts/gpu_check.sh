#!/usr/bin/env bash
# One pass on a CUDA machine: install gemmaquant, run the kernel and device tests on the GPU, then the benchmarks.
# Everything lands in $OUT (default gpu_out/): run.log (this script's output), kernel_tests.log, device_tests.log
# (tests/device: QAT on cuda, batched expert GPTQ on cuda vs the loop, ...), parity.jsonl (every
# parity check's kernel and reference error), kernels_mm.{json,md} (int4 / int8 / MoE, do_bench timer),
# kernels_mm_graph.{json,md} (the same, CUDA-graph timer), kernels_attn.{json,md} and tune.json (launch configs).
# Each stage has its own time limit, so a slow stage cannot starve the rest; the benchmarks write their results
# after every row.
#
#   scripts/gpu_check.sh                       # everything
#   STAGES="tests mm" scripts/gpu_check.sh      # some stages: tests, tune, mm, graph, attn, pipeline, decode, export
#   STAGES=decode scripts/gpu_check.sh          # decode tokens/s of int4 / int8 against bf16 on 26b-a4b and 31b
#                                               # layers, CUDA graphs, batch 1 and 16 (decode_model.{json,md})
#   STAGES=pipeline scripts/gpu_check.sh        # quantize on the GPU: a tiny quantize on cuda, the experts' GPTQ
#                                               # loop vs batched (gptq_experts_cuda.{json,md}), the dry-run
#                                               # estimate from throughput probed on the GPU (dry_run.txt), then
#                                               # bench_pipeline on 26b-a4b and 31b geometry (pipeline_quantize.log,
#                                               # pipeline_cuda.{json,md}: compare its projection with dry_run.txt)
#   STAGES=export scripts/gpu_check.sh          # GGUF fits on the GPU give the CPU's bytes (export_tests.log) and
#                                               # the 0.4B / 26B-width export timed on cuda against the CPU
#   BATCHES=1,16,256 scripts/gpu_check.sh
#
# Python packages missing on the machine can be put as wheels in .whl/ (installed with --no-index). The device
# image of session 16 (torch 2.11, Triton 3.6) lacked only gguf, which gemmaquant imports:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl gguf==0.19.0     # then carry .whl
# Session 16's stages took: set-up 12 s, tests 40-50 s, mm 35 s, attn 65 s (with FlexAttention at 32K).
set -u
OUT="${OUT:-gpu_out}"
PY="${PYTHON:-python3}"
STAGES="${STAGES:-pipeline decode export tests tune graph mm attn}"  # the quantize pipeline first: it has never run on a GPU
BATCHES="${BATCHES:-1,4,16,64,256}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
t0=$(date +%s)
stamp() { echo "=== $1 at +$(( $(date +%s) - t0 ))s"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl
fi
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . > /tmp/install.log 2>&1 \
    || { echo "pip install -e . failed:"; tail -20 /tmp/install.log; }
"$PY" -c "import torch, triton, gemmaquant.kernels; print('torch', torch.__version__, 'triton', triton.__version__,
'device', torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')" || exit 1
stamp "set-up done"

if [[ " $STAGES " == *" export "* ]]; then
    # every GGUF block fit (RTN and imatrix searches) on cuda against the CPU, byte for byte
    timeout "${EXPORT_TESTS_TIMEOUT:-150}" "$PY" -m pytest -q -p no:cacheprovider tests/formats/test_gguf_device.py \
        > "$OUT/export_tests.log" 2>&1
    echo "GGUF device tests exit status $?"
    tail -3 "$OUT/export_tests.log"
    # a synthetic checkpoint exported on cuda and on the CPU: seconds each, and whether the files are identical
    timeout "${EXPORT_BENCH_TIMEOUT:-300}" "$PY" benchmarks/bench_export.py --device-check --work /tmp/gq-export \
        > "$OUT/export_device.log" 2>&1
    echo "export on cuda exit status $?"
    tail -5 "$OUT/export_device.log"
    stamp "export done"
fi
if [[ " $STAGES " == *" tests "* ]]; then
    # test_benchmark_smoke_run runs the interpreter, which in Triton <= 3.6 fails with numpy >= 2.4 (int() of a
    # 1-element array, at every loop with run-time bounds); it runs where the interpreter tests run (CI).
    GQ_PARITY_LOG="$OUT/parity.jsonl" timeout "${TESTS_TIMEOUT:-180}" "$PY" -m pytest -q -p no:cacheprovider \
        -n "${TEST_WORKERS:-8}" tests/kernels --deselect tests/kernels/test_references_and_dispatch.py::test_benchmark_smoke_run \
        > "$OUT/kernel_tests.log" 2>&1
    echo "kernel tests exit status $?"
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/kernel_tests.log" | tail -30
    # the device tests: fake-CUDA ones run on the CPU anyway; the rest take device="cuda" where CUDA is (QAT's
    # whole qat_train on cuda, batched expert GPTQ on cuda against the loop, the OOM path, throughput probes, every
    # GGUF block fit on cuda against the CPU's bytes: test_gguf_device.py, skipped without CUDA)
    timeout "${DEVICE_TESTS_TIMEOUT:-180}" "$PY" -m pytest -q -p no:cacheprovider \
        tests/device tests/algorithms/test_gptq_batched.py tests/test_throughput.py tests/formats/test_gguf_device.py \
        > "$OUT/device_tests.log" 2>&1
    echo "device tests exit status $?"
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/device_tests.log" | tail -20
    stamp "tests done"
fi
if [[ " $STAGES " == *" tune "* ]]; then
    W="${WARM_WORKERS:-12}"  # compile the candidates in parallel first: Triton's cache then serves the timing pass
    pids=()
    for i in $(seq 0 $((W - 1))); do
        timeout "${WARM_TIMEOUT:-120}" "$PY" benchmarks/tune_kernels.py --warm-only --shard "$i/$W" > "/tmp/warm_$i.log" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"  # these only: a bare `wait` also waits for the tee behind this script's output, for ever
    stamp "tune: configs compiled"
    timeout "${TUNE_TIMEOUT:-150}" "$PY" benchmarks/tune_kernels.py --out "$OUT/tune.json"
    echo "tune exit status $?"
    stamp "tune done"
fi
if [[ " $STAGES " == *" mm "* ]]; then
    timeout "${MM_TIMEOUT:-150}" "$PY" benchmarks/bench_kernels.py --only int4,int8,moe --batches "$BATCHES" \
        --warmup 10 --rep 40 --out "$OUT/kernels_mm"
    echo "matmul / MoE benchmarks exit status $?"
    stamp "mm done"
fi
if [[ " $STAGES " == *" graph "* ]]; then
    timeout "${GRAPH_TIMEOUT:-150}" "$PY" benchmarks/bench_kernels.py --only int4,int8,moe,decode --batches "$BATCHES" \
        --timer graph --out "$OUT/kernels_mm_graph"
    echo "CUDA-graph-timed benchmarks exit status $?"
    stamp "graph done"
fi
if [[ " $STAGES " == *" attn "* ]]; then
    timeout "${ATTN_TIMEOUT:-180}" "$PY" benchmarks/bench_kernels.py --only decode,attn --batches "${ATTN_BATCHES:-1,16,64}" \
        --warmup 10 --rep 40 --out "$OUT/kernels_attn"
    echo "attention benchmarks exit status $?"
    stamp "attn done"
fi
if [[ " $STAGES " == *" pipeline "* ]]; then
    # a real quantization on the GPU (bf16 forward, batched expert statistics), its report beside the CPU default's
    timeout "${PIPE_Q_TIMEOUT:-120}" "$PY" -m gemmaquant.cli quantize tiny-moe --bits 4 --device cuda \
        --out "$OUT/tiny-moe-cuda" --overwrite --json > "$OUT/pipeline_quantize.log" 2>&1
    echo "quantize on cuda exit status $?"
    grep -E '"(device|quantize_seconds|kl_mean|top1)"' "$OUT/pipeline_quantize.log" | head -8
    # 128 experts of 26B-A4B's down_proj: GPTQ one expert at a time vs batched, side by side
    timeout "${PIPE_EXPERTS_TIMEOUT:-150}" "$PY" benchmarks/bench_gptq_experts.py --device cuda --experts 128 \
        --out "$OUT/gptq_experts_cuda"
    echo "bench_gptq_experts exit status $?"
    # the dry-run time estimate from throughput probed on this GPU (to set beside bench_pipeline's projection)
    GEMMAQUANT_CACHE="$OUT" timeout 120 "$PY" -m gemmaquant.cli quantize 26b-a4b --bits 4 --dry-run --device cuda \
        > "$OUT/dry_run.txt" 2>&1
    echo "dry run exit status $?"
    grep "time (estimate)" "$OUT/dry_run.txt"
    stamp "pipeline quantize, experts and dry run done"
    # whole-pipeline timing on 26B-A4B and 31B layer geometry: 2 layers, 32 x 2048 calibration tokens
    timeout "${PIPE_BENCH_TIMEOUT:-420}" "$PY" benchmarks/bench_pipeline.py --device cuda \
        --layers "${PIPE_LAYERS:-2}" --samples "${PIPE_SAMPLES:-32}" --seq-len 2048 --out "$OUT/pipeline_cuda"
    echo "bench_pipeline exit status $?"
    cat "$OUT/pipeline_cuda.md" 2>/dev/null
    stamp "pipeline done"
fi
if [[ " $STAGES " == *" decode "* ]]; then
    timeout "${DECODE_TIMEOUT:-180}" "$PY" benchmarks/bench_decode_model.py --batches "${DECODE_BATCHES:-1,16}" \
        --out "$OUT"
    echo "bench_decode_model exit status $?"
    cat "$OUT"/decode_model_cuda.md 2>/dev/null
    stamp "decode done"
fi
