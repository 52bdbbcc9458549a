#!/usr/bin/env bash
# The H200 runs of 2026-12-02 (issue 15), on the device machine, from the repo root:
#   bash docs/benchmarks/h200-2026-12-02.sh STEP...     (results under $OUT, tarred into $OUT/results.tgz)
# STEP: tests | gputests | gemv | base | a-repeat | async | limits | profile | profile-b | latency | serve  (each writes its logs and JSON as it finishes).
# serve: `shoal serve` on the 8B shape (dummy weights, Llama 3's tokenizer from tests/data) and
# `shoal bench serve` with exactly the dataset/config blocks of ../shared/peer/h200-2026-12-02/shoal_serve_c*.json.
# shoal itself runs from this checkout. SERVE_FLAGS: extra `shoal serve` flags (e.g. --async-scheduling);
# SERVE_RUNS: the concurrency:requests runs, in order, on one server (default "1:64 16:128 64:256").
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/r" /tmp/site/shoal
# .whl/ holds what the image lacks: llguidance (structured output; the model runner imports it; its wheel
# is manylinux_2_31, outside make-wheels' platforms: `pip download --no-deps --only-binary=:all:
# --python-version 3.12 -d .whl llguidance==1.9.1`), and from bash ../shared/device/make-wheels.sh gguf,
# and for `serve` fastapi,
# uvicorn, pydantic, grpcio 1.85.3, ...).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
for d in cluster kernels router workers; do ln -sfn "$PWD/$d" /tmp/site/shoal/$d; done
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p /tmp/site/bin
printf '#!/bin/sh\nexec python3 -c "import sys; from shoal.cluster.cli import main; sys.exit(main())" "$@"\n' > /tmp/site/bin/shoal
chmod +x /tmp/site/bin/shoal
export PATH=/tmp/site/bin:$PATH
pack() { tar -czf "$OUT/results.tgz" -C "$OUT" r; }
step() {  # step NAME TIMEOUT CMD...: run, log, pack
  local name=$1 t=$2; shift 2
  echo "=== $name: $*" | tee -a "$OUT/r/summary.txt"
  local s=$SECONDS
  timeout "$t" "$@" > "$OUT/r/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc $((SECONDS - s)) s" | tee -a "$OUT/r/summary.txt"
  tail -n 25 "$OUT/r/$name.log"
  pack
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv > "$OUT/r/gpu.txt" 2>&1
for s in "$@"; do
  case $s in
    tests)
      step kernels-compiled 240 python3 -P -m pytest -q -p no:cacheprovider tests/kernels
      step kernels-interpret 300 env SHOAL_KERNEL_TESTS=interpret python3 -P -m pytest -q -p no:cacheprovider tests/kernels
      step gpu-tests 240 python3 -P -m pytest -q -p no:cacheprovider tests/gpu ;;
    gemv)  # the skinny-GEMM kernel compiled on the GPU, then its sweep against cuBLAS (prints GEMV_TABLE)
      step gemv-tests 180 python3 -P -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py tests/kernels/test_gemv_model.py tests/kernels/test_benchmark_gemv.py
      step gemv-sweep 330 shoal bench kernels --gemv --result-file "$OUT/r/gemv.json" ;;
    gputests)
      step gpu-tests 240 python3 -P -m pytest -q -p no:cacheprovider tests/gpu ;;
    base)
      step a 200 shoal bench throughput --workload a --hf-subset 0 --result-file "$OUT/r/a.json"
      step b 240 shoal bench throughput --workload b --model llama-3.1-8b --hf-subset 0 --result-file "$OUT/r/b.json" ;;
    a-repeat)  # (a) three times in one lease: its spread between leases was 41-50k tok/s
      for i in 1 2 3; do
        step a-$i 200 shoal bench throughput --workload a --hf-subset 0 --result-file "$OUT/r/a-$i.json"
      done ;;
    async)  # base + latency with async scheduling on (opt-in until measured): the A/B of issue 15's first lever
      step a-async 200 shoal bench throughput --workload a --hf-subset 0 --async-scheduling --result-file "$OUT/r/a-async.json"
      step b-async 240 shoal bench throughput --workload b --model llama-3.1-8b --hf-subset 0 --async-scheduling --result-file "$OUT/r/b-async.json"
      step latency-async 200 shoal bench latency --prompt-lens 128 --decode-steps 256 --async-scheduling --result-file "$OUT/r/latency-async.json" ;;
    latency)
      step latency 200 shoal bench latency --prompt-lens 128 --decode-steps 256 --result-file "$OUT/r/latency.json" ;;
    limits)
      step a-limits 200 shoal bench throughput --workload a --hf-subset 0 --max-num-seqs 1024 --max-num-batched-tokens 16384 --result-file "$OUT/r/a-limits.json"
      step b-limits 240 shoal bench throughput --workload b --model llama-3.1-8b --hf-subset 0 --max-num-seqs 1024 --max-num-batched-tokens 16384 --result-file "$OUT/r/b-limits.json" ;;
    serve)
      gunzip -c tests/data/tokenizers/ggml-vocab-llama-bpe.gguf.gz > /tmp/llama3-vocab.gguf
      shoal serve --model llama-3.1-8b --load-format dummy --tokenizer /tmp/llama3-vocab.gguf --port 8100 ${SERVE_FLAGS:-} \
        > "$OUT/r/serve.log" 2>&1 &
      srv=$!
      for _ in $(seq 600); do
        curl -sf http://127.0.0.1:8100/ready > /dev/null && break
        kill -0 $srv 2> /dev/null || break
        sleep 0.5
      done
      n=0
      for c in ${SERVE_RUNS:-1:64 16:128 64:256}; do  # concurrency:requests
        n=$((n + 1))
        step "serve-$n-c${c%%:*}" 240 shoal bench serve --base-url http://127.0.0.1:8100 --dataset random \
          --num-prompts "${c##*:}" --input-len 512 --output-len 128 --range-ratio 0 --prompt-format ids \
          --token-id-range 1000 20000 --max-concurrency "${c%%:*}" --seed "${c%%:*}" --temperature 0 --session-key user \
          --save-detailed --result-file "$OUT/r/serve-$n-c${c%%:*}.json"
      done
      kill -TERM $srv; wait $srv; echo "serve exit $?" >> "$OUT/r/summary.txt"; pack ;;
    profile)
      step a-prof 200 shoal bench throughput --workload a --hf-subset 0 --no-ceilings --profile-kernels 256 --result-file "$OUT/r/a-prof.json" ;;
    profile-b)
      step b-prof 240 shoal bench throughput --workload b --model llama-3.1-8b --hf-subset 0 --no-ceilings --profile-kernels 128 --result-file "$OUT/r/b-prof.json"
      step b1-prof 120 shoal bench throughput --workload b --model llama-3.1-8b --hf-subset 0 --num-prompts 1 --no-ceilings --profile-kernels 1 --result-file "$OUT/r/b1-prof.json" ;;
  esac
done
