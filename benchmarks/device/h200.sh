#!/usr/bin/env bash
# One device call on the lent H200: install carried wheels, then the stage(s) named in $@.
#   kernels   GPU tests of the new kernels and model paths, then the skinny-matmul benchmark (sweep)
#   engine    jaxinfer bench latency (P1, HF peer), latency sweep, throughput (P2b, P2), startup
#   check     the engine's compile-counting test on the GPU
#   attention the attention kernels' GPU tests (head sizes 40, 80, 96 included)
#   attn_sweep  the paged decode and ragged kernels' benchmark with a sweep of tilings (H200 tables)
#   serve_clients  N concurrent streaming clients against `jaxinfer serve` (demo model; the
#             same engine offline at the same batch as the peer; first the client's ceiling
#             against a stand-in server; each server process's share of a core over the runs);
#             CLIENTS, CLIENT_PROCESSES, SERVE_MODES, SERVE_FLAGS, PACED
#   prefill   one 4096-token prompt through the 8B engine (HF peer): prefill against the matmul peak
#   fused     GPU tests of the fused norm, gated-matmul and rope/KV-write kernels and the engine's model paths
#   rms_norm  the fused residual-add RMSNorm kernel against XLA, over warps and chunks
#   short_decode_sweep  the ragged kernel's decode tilings on 64 decodes at context 384
#   matmul64  the skinny matmul's tilings at 64 tokens (the batch-64 decode's projections)
#   scan_unroll  batch 1 and 64 decode with the layer scan running UNROLLS="2 4 8" layers an iteration
#   prefix    TTFT cold / device hit / host hit and hit-rate throughput, with and without the host tier
#   host_copy the device <-> host copy paths the host tier can take (pageable, pinned), 64 pages
#   p2_gemm   P2 with XLA's Triton GEMMs off (its prefill GEMMs: cuBLAS against Triton fusions)
#   p1 | sweep | throughput | startup   one benchmark each (result files tagged with $TAG; PROFILE=1
#             traces one more whole throughput run)
#   quant     the quantized matmul kernel's GPU tests and its benchmark (with a tiling sweep)
#   w8a8      the W8A8 kernel's GPU tests, the matmul benchmark with W8A8 (sweep; XLA's 8-bit dot as peer)
#   quant_engine  batch 1 and 64 decode of the 8B shape in bf16 (HF peer) and each quantization
#   spec_cost     the 8B shape's step cost verifying k proposals per request (ACCEPTED="--accepted K:L ...")
#   spec_demo     speculative decoding on the demo model (n-gram, k = 4 and 8) at batch 1, 16, 64
#   spec_check    the speculative-decoding exactness and compile-count tests on the GPU
#   eagle_check   the EAGLE proposer against its float64 reference and the compile count, on the GPU
#   ceilings      copy, matrix-vector and matmul rates: JAX per call, JAX queued, PyTorch with CUDA events
#   structured    grammar-constrained decoding against unconstrained, 8B shape at batch 64 (PROFILE=1: host
#                 cProfile and a device trace of one more structured run)
#   moe           the grouped expert kernel's GPU tests, its benchmark against XLA's ragged dot (sweep),
#                 then batch-1 decode of MOE_PRESETS (default qwen3-30b-a3b) with the HF peer and a
#                 profile, and MOE_SWEEP=1 batches 1, 16, 64
#   gemma         Gemma 3 270M (the Q4_K_M GGUF) batch 1 with the HF peer, from the file carried in pieces
#                 under .cache/gemma_pieces/p1..p5 (one piece per call while the machine stays warm;
#                 p1 holds its sha256): the pieces are joined and checked first
#   eagle_demo    train an EAGLE head for the demo model, then bench speculative with it and n-gram
# Results land under $OUT. Run from the repository root: bash benchmarks/device/h200.sh kernels
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=/tmp/site:.
# The image's flax matches its JAX; carried wheels add what the image lacks (gguf).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L; python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
t0=$(date +%s)
for stage in "$@"; do
  case "$stage" in
    kernels)
      timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_skinny_matmul.py -k "TestGpuMatmul and not Interpret" 2>&1 | tail -4
      timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_flax_model.py -k "layer_loops" 2>&1 | tail -6
      timeout 380 python3 benchmarks/matmul.py --out "$OUT/matmul" --sweep 2>&1 | tee "$OUT/matmul.log" | tail -60 ;;
    engine)
      timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_flax_model.py -k "layer_loops" 2>&1 | tail -4
      timeout 240 python3 -m jaxinfer.cli bench latency --preset llama3-8b --input-len 128 --output-len 256 \
        --batch-size 1 --hf-peer --profile --output-dir "$OUT/engine" 2>&1 | grep -v "compiling buckets" | tail -8
      timeout 200 python3 -m jaxinfer.cli bench latency --preset llama3-8b --input-len 128 --output-len 512 \
        --batch-size 1,16,64 --num-iters 1 --profile --output-dir "$OUT/engine" --tag sweep 2>&1 \
        | grep -v "compiling" | tail -6 ;;
    variants)
      export XLA_CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
      XLA_FLAGS="$XLA_CB" timeout 150 python3 -m jaxinfer.cli bench latency --preset llama3-8b --input-len 128 \
        --output-len 256 --num-iters 2 --profile --output-dir "$OUT/engine" --tag cmdbuf_while 2>&1 \
        | grep -v "compiling" | tail -3 | cut -c1-1500
      timeout 200 python3 -m jaxinfer.cli bench latency --preset llama3-8b --input-len 128 --output-len 256 \
        --num-iters 2 --profile --no-scan-layers --output-dir "$OUT/engine" --tag unrolled 2>&1 \
        | grep -v "compiling" | tail -3 | cut -c1-1500 ;;
    final)
      timeout 150 python3 -m jaxinfer.cli bench latency --preset llama3-8b --input-len 128 --output-len 256 \
        --batch-size 1 --hf-peer --profile --output-dir "$OUT/engine" --tag async 2>&1 | grep -v "compiling" \
        | tail -3 | cut -c1-2500
      timeout 120 python3 -m jaxinfer.cli bench latency --preset llama3-8b --input-len 128 --output-len 512 \
        --batch-size 1,16,64 --num-iters 1 --profile --output-dir "$OUT/engine" --tag async_sweep 2>&1 \
        | grep -v "compiling" | tail -4 | cut -c1-1200
      timeout 110 python3 -m jaxinfer.cli bench throughput --preset llama3-8b --input-len 512 --output-len 128 \
        --num-prompts 256 --num-iters 1 --output-dir "$OUT/engine" 2>&1 | grep -v "compiling" | tail -3
      timeout 160 python3 -m jaxinfer.cli bench startup --preset llama3-8b --input-len 128 --output-len 8 \
        --output-dir "$OUT/engine" --tag async 2>&1 | grep -v "compiling" | tail -3 ;;
    moe)
      timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_grouped_matmul.py \
        -k "TestGroupedMatmul and not Interpret" 2>&1 | tail -4
      [ "${MOE_KERNEL_BENCH:-1}" != 0 ] && timeout 300 python3 benchmarks/grouped_matmul.py --out "$OUT/grouped" \
        ${MOE_KERNEL_SWEEP:+--sweep} 2>&1 | tee "$OUT/grouped.log" | grep -v '^{' | tail -25
      for preset in ${MOE_PRESETS:-qwen3-30b-a3b}; do
        timeout ${MOE_TIMEOUT:-300} python3 -m jaxinfer.cli bench latency --preset "$preset" --input-len 128 \
          --output-len 256 --batch-size 1 ${MOE_PEER---hf-peer} --profile --output-dir "$OUT/engine" \
          --tag "${TAG:-moe}" 2>&1 | grep -v "compiling" | tail -4 | cut -c1-2500
        [ -n "${MOE_SWEEP:-}" ] && timeout 300 python3 -m jaxinfer.cli bench latency --preset "$preset" \
          --input-len 128 --output-len 256 --batch-size 1,16,64 --num-iters 1 --output-dir "$OUT/engine" \
          --tag "${TAG:-moe}_sweep" 2>&1 | grep -v "compiling" | tail -4 | cut -c1-1500
      done ;;
    gemma)
      mkdir -p /tmp/gemma && cat .cache/gemma_pieces/p*/gpiece_* > /tmp/gemma/gemma-3-270m-q4_k_m.gguf
      echo "$(cat .cache/gemma_pieces/p1/sha256)  /tmp/gemma/gemma-3-270m-q4_k_m.gguf" | sha256sum -c || exit 1
      timeout 300 python3 -m jaxinfer.cli bench latency --model /tmp/gemma/gemma-3-270m-q4_k_m.gguf --input-len 128 \
        --output-len 256 --batch-size 1,16,64 --hf-peer --profile --output-dir "$OUT/engine" --tag "${TAG:-gemma}" \
        2>&1 | grep -v "compiling" | tail -4 | cut -c1-2500 ;;
    spec_cost)
      timeout 400 python3 -m jaxinfer.cli bench verify-cost --preset llama3-8b --batch-size 1,16,64 \
        --num-tokens 0,1,2,4,8 --input-len 512 --num-steps 48 --output-dir "$OUT/engine" ${ACCEPTED:-} \
        --tag "${TAG:-}" 2>&1 \
        | grep -v "compiling" | tail -24 ;;
    spec_demo)
      # The demo GGUF travels in two carried parts (each call carries at most 64 MiB).
      [ -f /tmp/smol.gguf ] || cat /tmp/smol.part_aa .cache/model/smol.part_ab > /tmp/smol.gguf
      for tag in ${SPEC_TAGS:-k4 k8 k8_throttle16}; do
        case $tag in
          k4) cfg='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}' ;;
          k8) cfg='{"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 2, "prompt_lookup_max": 4}' ;;
          *) cfg='{"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 2, "prompt_lookup_max": 4,
                   "disable_by_batch_size": 16}' ;;
        esac
        timeout 300 python3 -m jaxinfer.cli bench speculative --model /tmp/smol.gguf --batch-size 1,16,64 \
          --output-len 256 --speculative-config "$cfg" --output-dir "$OUT/engine" --tag "$tag${TAG:-}" 2>&1 \
          | grep -v "compiling" | tail -7 | cut -c1-400
      done ;;
    eagle_check)
      # Exact proposals against float64 need float32 dots: XLA's default on GPUs is TF32.
      JAX_DEFAULT_MATMUL_PRECISION=highest timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_eagle.py -k "numpy_reference or compiles" \
        2>&1 | tail -${TAIL:-40} | cut -c1-300 ;;
    ceilings)
      timeout 120 python3 benchmarks/device/ceilings.py --out "$OUT/ceilings.json" 2>&1 | grep -v Warning | tail -8 ;;
    structured)
      for run in ${RUNS:-1 2}; do
        timeout 200 python3 -m jaxinfer.cli bench structured --preset llama3-8b --batch-size 64 --input-len 64 \
          --max-tokens 256 --tokenizer .cache/structured_bench/tokenizer.json --output-dir "$OUT/engine" \
          --tag "${TAG:-}r$run" ${PROFILE:+--profile} 2>&1 | grep -v "compiling" | tail -4 | cut -c1-3000
      done ;;
    eagle_demo)
      # An EAGLE head trained here on the demo model's own answers (stdlib docstrings, never the
      # benchmark's passages), then the speculative benchmark with it and with n-gram lookup.
      [ -f /tmp/smol.gguf ] || cat /tmp/smol.part_aa .cache/model/smol.part_ab > /tmp/smol.gguf
      [ -d /tmp/eagle_head ] || timeout 300 python3 -m jaxinfer.cli train-eagle --model /tmp/smol.gguf \
        --output /tmp/eagle_head --steps "${EAGLE_STEPS:-3000}" 2>&1 | grep -vE "compiling|Warning" | tail -8 | cut -c1-300
      cp /tmp/eagle_head/training.json "$OUT/eagle_training.json"
      for tag in ${SPEC_TAGS:-eagle_k4 ngram_k4}; do
        case $tag in
          eagle_k*) cfg="{\"method\": \"eagle\", \"model\": \"/tmp/eagle_head\", \"num_speculative_tokens\": ${tag#eagle_k}}" ;;
          ngram_k*) cfg="{\"method\": \"ngram\", \"num_speculative_tokens\": ${tag#ngram_k}, \"prompt_lookup_min\": 2, \"prompt_lookup_max\": 4}" ;;
        esac
        timeout 300 python3 -m jaxinfer.cli bench speculative --model /tmp/smol.gguf --batch-size ${SPEC_BATCHES:-1,16,64} \
          --output-len 256 --speculative-config "$cfg" --output-dir "$OUT/engine" --tag "$tag${TAG:-}" 2>&1 \
          | grep -v "compiling" | tail -7 | cut -c1-400
      done ;;
    spec_all)
      # The demo measurements first; their mean accepted lengths (rewrite, batch 1) then give
      # the 8B shape's expected speedups from its measured step costs.
      bash "$0" spec_demo
      ACCEPTED=$(python3 - "$OUT/engine" <<'PY'
import glob, json, sys
for k in (4, 8):
    for path in glob.glob(f"{sys.argv[1]}/bench_speculative_*_k{k}.json"):
        row = next(r for r in json.load(open(path))["results"] if r["workload"] == "rewrite" and r["batch_size"] == 1)
        print(f"--accepted {k}:{row['on']['mean_accepted_length']:.3f}", end=" ")
PY
) bash "$0" spec_cost ;;
    spec_check)
      timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_speculative.py -k "greedy_equals or compiles" \
        2>&1 | tail -3 ;;
    check)
      timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine.py -k no_compiles 2>&1 | tail -3 ;;
    attention)
      timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_ragged_paged_attention.py \
        tests/test_paged_attention.py tests/test_flash_attention.py -k "not Interpret" 2>&1 | tail -4 ;;
    attn_sweep)
      timeout 520 python3 benchmarks/kernels.py --out "$OUT/kernels" --sweep --page-sizes 16,32 --repeats 5 \
        2>&1 | tee "$OUT/kernels.log" | grep -E "FAIL|ceiling|default|stock|reference" | cut -c1-200 ;;
    serve_clients)
      [ -f /tmp/smol.gguf ] || cat ${SMOL_PART_AA:-/tmp/smol.part_aa} .cache/model/smol.part_ab > /tmp/smol.gguf
      n=${CLIENTS:-256}; len=${LEN:-128}; port=8011; procs=${CLIENT_PROCESSES:-4}
      clients() {  # $1: result file; the first of two runs warms the server's paths
        for run in 1 2; do
          timeout 300 python3 -m jaxinfer.cli bench serve --base-url "http://127.0.0.1:$port" \
            --model "${MODEL_NAME:-/tmp/smol.gguf}" --endpoint completions --num-prompts $((2 * n)) \
            --request-rate inf --max-concurrency "$n" --input-len "$len" --output-len "$len" --ignore-eos \
            --client-processes "${CP:-$procs}" --result-file "$1" 2>&1 | grep -E "output tokens|TPOT|TTFT|failed"
        done
      }
      wait_ready() {
        for _ in $(seq 600); do
          python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=1)" \
            2>/dev/null && return; kill -0 "$1" 2>/dev/null || return; sleep 0.5
        done
      }
      # The client's ceiling: a stand-in server streaming one chunk per request every 15 ms.
      if [ "${PACED:-1}" = 1 ]; then  # PACED=0 skips it (measured once per host is enough)
        python3 benchmarks/device/paced_sse_server.py $port 0.015 & pid=$!; wait_ready $pid
        for cp in 1 "$procs"; do
          CP=$cp MODEL_NAME=paced clients "$OUT/serve_clients_paced_cp$cp.json"
        done
        kill $pid; wait $pid 2>/dev/null
      fi
      for mode in ${SERVE_MODES:-process}; do
        flags=""; [ "$mode" = process ] && flags="--engine-process"
        python3 -m jaxinfer.cli serve --model /tmp/smol.gguf --port $port --max-num-seqs "$n" \
          --max-model-len 1024 $flags ${SERVE_FLAGS:-} > "$OUT/serve_$mode.log" 2>&1 &
        pid=$!; wait_ready $pid
        python3 benchmarks/device/proc_cpu.py $pid > /tmp/cpu_before.json; t0=$(date +%s)
        clients "$OUT/serve_clients_$mode.json"
        # Each server process's share of a core over both runs: is the event loop or the engine the bound?
        python3 benchmarks/device/proc_cpu.py $pid --since /tmp/cpu_before.json \
          --wall "$(( $(date +%s) - t0 ))" | tee "$OUT/serve_cpu_$mode.json"
        kill -INT $pid; wait $pid
      done
      timeout 200 python3 -m jaxinfer.cli bench throughput --model /tmp/smol.gguf --input-len "$len" \
        --output-len "$len" --num-prompts "$n" --num-iters 3 --max-model-len 1024 \
        --output-dir "$OUT/engine" --tag "offline_clients${TAG:-}" 2>&1 | grep -v compiling | tail -3 ;;
    prefill)
      timeout 200 python3 -m jaxinfer.cli bench latency --preset llama3-8b --input-len 4096 --output-len 2 \
        --batch-size 1 --max-num-batched-tokens 8192 --hf-peer --output-dir "$OUT/engine" \
        --tag "prefill4096${TAG:-}" 2>&1 | grep -v "compiling" | tail -3 | cut -c1-2000 ;;
    fused)
      timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_rms_norm_kernel.py tests/test_skinny_matmul.py \
        tests/test_rope_kv_write.py tests/test_ragged_paged_attention.py -k "Gpu and not Interpret" 2>&1 | tail -4
      timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_flax_model.py tests/test_engine.py \
        -k "layer_loops or pallas_backend" 2>&1 | tail -4 ;;
    short_decode_sweep)
      timeout 420 python3 benchmarks/kernels.py --out "$OUT/kernels" --sweep --ragged-only \
        --ragged-batches "decodes at context 384" --repeats 5 2>&1 | tee "$OUT/kernels.log" \
        | grep -E "FAIL|ceiling|context 384" | sort -t' ' -k1,1 | cut -c1-200 ;;
    matmul64)
      timeout 500 python3 benchmarks/matmul.py --out "$OUT/matmul" --sweep --tokens ${SWEEP_TOKENS:-64} --sweep-tokens ${SWEEP_TOKENS:-64} \
        --no-peer --no-scan 2>&1 | tee "$OUT/matmul.log" | tail -40 ;;
    scan_unroll)
      for k in ${UNROLLS:-2 4 8}; do
        timeout 170 python3 -m jaxinfer.cli bench latency --preset llama3-8b --input-len 128 --output-len 512 \
          --batch-size 1,64 --num-iters 1 --profile --scan-unroll "$k" --output-dir "$OUT/engine" \
          --tag "${TAG:-}unroll$k" 2>&1 | grep -v "compiling" | tail -3 | cut -c1-400
      done ;;
    rms_norm)
      timeout 240 python3 benchmarks/rms_norm.py --out "$OUT/rms_norm" --iters 100 --repeats 3 2>&1 | tail -12 ;;
    p1)
      timeout 170 python3 -m jaxinfer.cli bench latency --preset llama3-8b --input-len 128 --output-len 256 \
        --batch-size 1 --hf-peer --profile --output-dir "$OUT/engine" --tag "${TAG:-}" 2>&1 | grep -v "compiling" \
        | tail -3 | cut -c1-2500 ;;
    sweep)
      timeout 170 python3 -m jaxinfer.cli bench latency --preset llama3-8b --input-len 128 --output-len 512 \
        --batch-size 1,16,64 --num-iters 1 --profile --output-dir "$OUT/engine" --tag "${TAG:-}sweep" 2>&1 \
        | grep -v "compiling" | tail -4 | cut -c1-3000 ;;
    throughput)
      timeout 200 python3 -m jaxinfer.cli bench throughput --preset llama3-8b --input-len 512 --output-len 128 \
        --num-prompts 256 --num-iters 1 ${PROFILE:+--profile} --output-dir "$OUT/engine" --tag "${TAG:-}" 2>&1 \
        | grep -v "compiling" | tail -4 | cut -c1-3000 ;;
    p2_gemm)
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" timeout 200 python3 -m jaxinfer.cli bench \
        throughput --preset llama3-8b --input-len 512 --output-len 128 --num-prompts 256 --num-iters 1 \
        ${PROFILE:+--profile} --output-dir "$OUT/engine" --tag "${TAG:-}no_triton_gemm" 2>&1 \
        | grep -v "compiling" | tail -4 | cut -c1-3000 ;;
    prefix)
      timeout 300 python3 -m jaxinfer.cli bench prefix --preset llama3-8b --output-dir "$OUT/prefix" \
        --tag "${TAG:-}" 2>&1 | grep -vE "compiling|Warning" | tail -22 | cut -c1-3000 ;;
    host_copy)
      timeout 150 python3 benchmarks/device/host_copy.py --pages 64 --alloc-batches 40 \
        --out "$OUT/host_copy_64.json" 2>&1 | cut -c1-200 ;;
    startup)
      timeout 220 python3 -m jaxinfer.cli bench startup --preset llama3-8b --input-len 128 --output-len 8 \
        --output-dir "$OUT/engine" --tag "${TAG:-}" 2>&1 | grep -v "compiling" | tail -4 ;;
    quant)
      timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_quantized_matmul.py \
        -k "TestQuantizedMatmul and not Interpret" 2>&1 | tail -4
      timeout 400 python3 benchmarks/quantized_matmul.py --out "$OUT/qmm" --sweep 2>&1 | tee "$OUT/qmm.log" \
        | tail -52 ;;
    w8a8)
      timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_w8a8.py -k "not Interpret" 2>&1 | tail -3
      timeout 420 python3 benchmarks/quantized_matmul.py --out "$OUT/qmm" --sweep --sweep-kinds w8a8_int8,w8a8_fp8 \
        --kinds "${QMM_KINDS:-int8,fp8,w8a8_int8,w8a8_fp8}" 2>&1 | tee "$OUT/qmm.log" | grep -E "^\| |compiled" | cut -c1-200 ;;
    quant_engine)
      for q in ${QUANT_MODES:-none int8 int4 fp8}; do
        flags=""; [ "${HF_PEER:-1}" = 1 ] && flags="--hf-peer"; [ "$q" != none ] && flags="--quantization $q"
        timeout 200 python3 -m jaxinfer.cli bench latency --preset llama3-8b --input-len 128 --output-len 256 \
          --batch-size 1,64 --num-iters 1 $flags --output-dir "$OUT/engine" --tag "quant_$q${TAG:-}" 2>&1 \
          | grep -v "compiling" | tail -${TAIL:-4} | cut -c1-1500
      done ;;
  esac
  echo "== stage $stage done at +$(( $(date +%s) - t0 )) s"
done
