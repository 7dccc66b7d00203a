#!/usr/bin/env bash
# llama.cpp runs our GGUF exports with our logits: build llama-cpp-python, train (or take) a CPU-scale RoPE model
# (with activation=gelu_tanh, the GELU llama.cpp computes; a given exact-GELU CKPT is checked against our model run
# with llama.cpp's GELU instead), extend it training-free with PI and YaRN (x4), and train an ALiBi model too
# (unless CKPT is given); export each in f32, f16, bf16 and q8_0, and compare with llama.cpp at L and 4L.
#
#   scripts/check_llama_cpp.sh                           # everything, a tiny model trained here (minutes on 2 cores)
#   CKPT=out/cpu_rope/ckpt.pt DATA=data/stdlib scripts/check_llama_cpp.sh   # a trained full-vocabulary RoPE model
#
# Env: WORK (default out/check_llama_cpp), MAX_ITERS (default 60: parity needs a trained model, not a good one),
# THREADS (default: all).
# The report (parity table, perplexity past L, tokens/s, llama.cpp's version, build time) is $WORK/report/report.md;
# the exit status is the check's. Compact-vocabulary data (prepare.py --vocab_size) cannot be exported.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-out/check_llama_cpp}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-llama-cpp-python==0.3.36}
mkdir -p "$WORK"

python -c "import gguf" 2>/dev/null || pip install gguf
BUILD_SECONDS=""
if ! python -c "import llama_cpp" 2>/dev/null; then
  echo "building $LLAMA_CPP_PYTHON from source (cmake and a C++ compiler; the library only, no tools or llava)"
  start=$(date +%s)
  CMAKE_ARGS=${CMAKE_ARGS:-"-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF"} \
    pip install "$LLAMA_CPP_PYTHON" > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
  BUILD_SECONDS=$(( $(date +%s) - start ))
  echo "built in $BUILD_SECONDS s (log: $WORK/build.log)"
fi

if [ -z "${CKPT:-}" ]; then
  DATA=$WORK/data
  [ -f "$DATA/meta.json" ] || python -m data.prepare --out_dir="$DATA" --max_tokens=2000000
  for scheme in rope alibi; do  # gelu_tanh, llama.cpp's GELU: parity with the model as it is
    [ -f "$WORK/$scheme/ckpt.pt" ] || python train.py configs/cpu.toml --data_dir="$DATA" --out_dir="$WORK/$scheme" \
      --max_iters="${MAX_ITERS:-60}" --eval_interval=0 --ckpt_interval=0 --pos_encoding=$scheme \
      --activation=gelu_tanh --overwrite=true
  done
  CKPT=$WORK/rope/ckpt.pt
  MORE=",$WORK/alibi/ckpt.pt"  # ALiBi runs in llama.cpp's mpt
fi
: "${DATA:?give DATA=<the data_dir the checkpoint was trained on> with CKPT}"
RUN=$(dirname "$CKPT")
for method in linear yarn; do  # training-free: the same weights under the scaled config
  [ -f "${RUN}_${method}_x4/ckpt.pt" ] || python extend_context.py --ckpt="$CKPT" --method=$method --factor=4 \
                                            --steps=0 --out_dir="${RUN}_${method}_x4"
done

python -m scripts.check_llama_cpp --ckpts="$CKPT,${RUN}_linear_x4/ckpt.pt,${RUN}_yarn_x4/ckpt.pt${MORE:-}" \
  --data_dir="$DATA" --out_dir="$WORK/report" --build_seconds="$BUILD_SECONDS" ${THREADS:+--threads=$THREADS}
