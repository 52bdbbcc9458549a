#!/usr/bin/env bash
# Disaggregated vs unified serving on a 2-GPU machine: the same Poisson load of long prompts against
# (a) two unified workers, one per GPU, and (b) one prefill + one decode worker; `shoal bench serve`
# reports inter-token latency (ITL) percentiles for both. Usage: bash docs/benchmarks/disagg-itl.sh OUTDIR
# On the GPU image the router needs wheels it lacks: ../shared/device/make-wheels.sh builds them
# (fastapi also imports opentelemetry-api).
set -u
out=${1:-/tmp/disagg-itl}; mkdir -p "$out"
gunzip -c tests/data/tokenizers/ggml-vocab-llama-bpe.gguf.gz > /tmp/llama3-vocab.gguf  # Llama-3's tokenizer
serve=(python3 -m shoal.cluster.cli serve --model llama-3.1-8b --load-format dummy --tokenizer /tmp/llama3-vocab.gguf
       --max-model-len 10240 --max-num-seqs 64 --port 8100)
load=(python3 -m shoal.cluster.cli bench serve --base-url http://127.0.0.1:8100 --dataset random
      --input-len 6000 --range-ratio 0.33 --output-len 256 --num-prompts 48 --request-rate 1.5 --seed 0)
run() {  # run NAME SERVE_FLAGS...
  local name=$1; shift
  "${serve[@]}" "$@" > "$out/serve-$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do
    grep -q "ready on" "$out/serve-$name.log" && break
    kill -0 $pid 2>/dev/null || break  # it died: do not wait out the loop
    sleep 1
  done
  if grep -q "ready on" "$out/serve-$name.log"; then
    timeout 150 "${load[@]}" --result-file "$out/$name.json" > "$out/bench-$name.log" 2>&1
    echo "== $name: bench rc=$?"; grep -E "itl|ITL|ttft|TTFT|tok/s|throughput" "$out/bench-$name.log" | head -20
  else
    echo "== $name: serve did not start"; tail -20 "$out/serve-$name.log"
  fi
  kill -TERM $pid; wait $pid
}
run unified --workers 2
run disagg --prefill-workers 1 --workers 1 --disagg-min-prefill-tokens 512
