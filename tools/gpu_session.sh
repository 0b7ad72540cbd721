#!/usr/bin/env bash
# What we run on a lent H100 / H200 (the device tool), in one go: the GPU tests of the kernels, the attention
# benchmark and DiT training-step benchmarks. Results go to $OUT (or ./gpu_results).
#   bash tools/gpu_session.sh tests attention dit14 dit13 memory
#   bash tools/gpu_session.sh e2e        # tools/gpu_e2e.py: data -> train (killed, resumed) -> FP8 -> generate ->
#                                        # diffusers -> kernel tests; e2e.json + e2e.log. Besides megatron-core and
#                                        # diffusers it needs the wheels of av, zarr, numcodecs, donfig and
#                                        # google-crc32c in .whl/ (it names what is missing and stops at once);
#                                        # DALI (hundreds of MB) cannot travel in the 64 MiB: PyAV decodes instead
#   bash tools/gpu_session.sh fp8         # issue 25, ~8 min on one H200: the FP8 kernel tests, then megawan bf16,
#                                        # ours FP8 (current, delayed), torchao FP8, diffusers eager and compiled on
#                                        # the 14B-width 2-block stack (37,440 tokens) and the 1.3B model (32,760
#                                        # tokens, full recompute). torchao travels as a wheel: on a machine with
#                                        # network `pip download --no-deps -d .whl torchao==<the one built for the
#                                        # GPU image's torch>` (its float8 training is pure Python), then run with
#                                        # carry [".whl"]; without it the torchao row says "skipped" and why
set -uo pipefail
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
if [ -d .whl ]; then  # megatron-core, diffusers, ... carried as wheels (the GPU image has torch and Triton)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.limit --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
dit() { local name=$1; shift; timeout ${LIMIT:-400} python3 tools/bench_dit.py "$@" --json "$OUT/$name.json" 2>&1 | grep -v Warning | tee "$OUT/$name.log" | tail -6; }
for stage in "$@"; do
  echo "== $stage"
  case $stage in
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fp8_attention.py \
             tests/test_bench_dit.py 2>&1 | tee "$OUT/pytest.log" | tail -4 ;;
    attention) timeout 300 python3 tools/bench_attention.py --tokens 32760 37440 --heads ${HEADS:-12 40} \
             --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" | tail -14 ;;
    dit14) dit dit14_bf16 --model wan2.1-t2v-14b --layers 2 --latent 24 60 104 --compare diffusers --warmup 2 --steps 5
           dit dit14_fp8 --model wan2.1-t2v-14b --layers 2 --latent 24 60 104 --precision fp8 --compare --warmup 2 --steps 5
           dit dit14_fp8attn --model wan2.1-t2v-14b --layers 2 --latent 24 60 104 --precision fp8 --fp8-attention \
               --compare --warmup 2 --steps 5 ;;
    dit13) dit dit13_bf16 --model wan2.1-t2v-1.3b --latent 21 60 104 --recompute full --compare diffusers \
               diffusers-compile megawan-compile --warmup 2 --steps 4 ;;
    profile) timeout 300 python3 tools/profile_dit.py --model wan2.1-t2v-14b --layers 2 --latent 24 60 104 \
             --json "$OUT/profile.json" 2>&1 | grep -v Warning | tee "$OUT/profile.log" | tail -40 ;;
    dit14-torchkernels) MEGAWAN_KERNELS=torch dit dit14_torchkernels --model wan2.1-t2v-14b --layers 2 \
             --latent 24 60 104 --compare --warmup 2 --steps 5 ;;
    dit14-compile) LIMIT=220 dit dit14_compile --model wan2.1-t2v-14b --layers 2 --latent 24 60 104 \
             --compare megawan-compile diffusers diffusers-compile --warmup 2 --steps 4 ;;
    dit14-fp8-compile) LIMIT=150 dit dit14_fp8_compile --model wan2.1-t2v-14b --layers 2 --latent 24 60 104 \
             --precision fp8 --compare megawan-compile --warmup 2 --steps 4 ;;
    memory) LIMIT=80 dit mem720_none --model wan2.1-t2v-14b --layers 2 --latent 21 90 160 --compare --warmup 1 --steps 2
            LIMIT=80 dit mem720_full --model wan2.1-t2v-14b --layers 2 --latent 21 90 160 --recompute full --compare \
               --warmup 1 --steps 2 ;;
    dit13-quick) LIMIT=150 dit dit13_bf16 --model wan2.1-t2v-1.3b --latent 21 60 104 --recompute full \
               --compare diffusers --warmup 1 --steps 3 ;;
    final) LIMIT=130 dit f14_bf16 --model wan2.1-t2v-14b --layers 2 --latent 24 60 104 --compare diffusers \
             --warmup 2 --steps 4
           LIMIT=100 dit f14_fp8 --model wan2.1-t2v-14b --layers 2 --latent 24 60 104 --precision fp8 --compare \
             --warmup 2 --steps 4
           LIMIT=130 dit f13_bf16 --model wan2.1-t2v-1.3b --latent 21 60 104 --recompute full --compare diffusers \
             --warmup 1 --steps 3
           MEGAWAN_KERNELS=triton LIMIT=45 dit f14_triton --model wan2.1-t2v-14b --layers 2 --latent 24 60 104 \
             --compare --warmup 2 --steps 4 ;;
    fp8) timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fp8_transpose.py \
             tests/test_fp8_delayed.py 2>&1 | tee "$OUT/pytest_fp8.log" | tail -3
         FP8="megawan-fp8 megawan-fp8-delayed megawan-fp8-torchao diffusers diffusers-compile"
         LIMIT=200 dit fp8_dit14 --model wan2.1-t2v-14b --layers 2 --latent 24 60 104 --compare $FP8 \
             --warmup 2 --steps 4
         LIMIT=260 dit fp8_dit13 --model wan2.1-t2v-1.3b --latent 21 60 104 --recompute full --compare $FP8 \
             --warmup 1 --steps 3 ;;
    e2e) # its own --budget (450 s) cuts its children short; on SIGTERM it kills them and leaves its JSON written
         timeout -k 15 ${LIMIT:-480} python3 tools/gpu_e2e.py --json "$OUT/e2e.json" 2>&1 | grep -v Warning \
             | tee "$OUT/e2e.log" | tail -40 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
