#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run (README: "GPU build and checks").
#
#   scripts/gpu-check.sh pack      # here: build with --features cuda, pack binaries + fixtures
#   scripts/gpu-check.sh run       # on the GPU machine, from the repository root
#   scripts/gpu-check.sh run parity demo   # only some parts (parity, speed, demo)
#   scripts/gpu-check.sh pack seg  # the segmentation checks instead (then `run seg`): the two
#                                  # packs do not fit together in the device's 64 MiB carry
#
# `pack` builds `evax` and the parity test binaries with the CUDA toolkit from the package
# registry (set up as README describes; `CUDA_ENV` names the file that exports its variables),
# strips and compresses them into `.gpu/` with the fixtures the tests read. `run` needs only the
# NVIDIA driver and a Python with PyTorch + timm (for the PyTorch side of the speed figures);
# it writes everything it prints to `$OUT/gpu-check.log` (default /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=.gpu

pack() {
    set -e
    # shellcheck disable=SC1090
    source "${CUDA_ENV:-/work/cuda-env.sh}"
    local shared=${EVAX_SHARED:-../shared}
    cargo build --release --features cuda
    local tests
    local which=(--test parity --test train)
    local fixtures=(reference.safetensors eva_x_ti_cxr14_ft.pth ti_param_groups.json)
    if [[ "${1:-}" == seg ]]; then
        which=(--test segment)
        fixtures=(seg_reference.safetensors upernet_eva_x_s_d2_seg.pth)
    fi
    tests=$(cargo test --release --features cuda --no-run --message-format=json \
        "${which[@]}" 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')
    rm -rf "$PACK" && mkdir -p "$PACK/shared/fixtures"
    local dir=${CARGO_TARGET_DIR:-target}/release
    strip -o "$PACK/evax" "$dir/evax"
    while read -r name exe; do strip -o "$PACK/test-$name" "$exe"; done <<<"$tests"
    xz -T2 -6 "$PACK"/evax "$PACK"/test-*
    for f in "${fixtures[@]}"; do
        cp "$shared/fixtures/$f" "$PACK/shared/fixtures/"
    done
    du -sh "$PACK" "$PACK"/* "$PACK"/shared/fixtures/*
}

run() {
    local parts=${*:-parity speed demo}
    local out=${OUT:-/tmp/gpu-check}
    mkdir -p "$out"
    exec > >(tee -a "$out/gpu-check.log") 2>&1
    local bin=/tmp/evax-gpu
    mkdir -p "$bin"
    for f in "$PACK"/*.xz; do
        python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
            "$f" "$bin/$(basename "$f" .xz)"
        chmod +x "$bin/$(basename "$f" .xz)"
    done
    # The CUDA libraries of the Python environment's NVIDIA wheels, and the driver itself (the
    # binaries leave the driver's symbols to be resolved at load time).
    local lib
    lib=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))")
    export LD_LIBRARY_PATH=$lib:${LD_LIBRARY_PATH:-} LD_PRELOAD=libcuda.so.1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    lscpu | grep -E "Model name|^CPU\(s\)"
    local evax=$bin/evax
    export EVAX_SHARED=$PWD/$PACK/shared EVAX_TEST_DEVICE=cuda
    if [[ " $parts " == *" parity "* ]]; then
    echo "== 1. parity on cuda (f32, the CPU's tolerances) and the reduced-precision agreement"
    "$bin/test-parity" --test-threads 1 --nocapture ti_ft reduced 2>&1 | grep -Ev "^\s*$"
    "$bin/test-train" --test-threads 1 --nocapture 2>&1 | grep -Ev "^\s*$"
    fi
    if [[ " $parts " == *" seg "* ]]; then
    echo "== segmentation on cuda (after 'pack seg'): the library-level tests (the CLI ones run"
    echo "   the binary at its path on the build machine), then bench"
    "$bin/test-segment" --test-threads 1 --nocapture forward_matches_the_original_fused \
        reduced_precision train_step_matches_the_original_fused 2>&1 | grep -Ev "^\s*$"
    for prec in f32 bf16; do
        "$evax" bench --device cuda --model seg-s --input-size 512 --batch 4 --iters 5 --precision $prec
    done
    "$evax" bench --device cuda --model seg-s --input-size 512 --batch 4 --iters 3 --train
    fi
    unset EVAX_TEST_DEVICE
    if [[ " $parts " == *" speed "* ]]; then
    echo "== 2. speed: evax bench beside PyTorch (timm Eva as EVA-X) on the same GPU"
    for prec in f32 bf16; do
        for m in s b; do
            "$evax" bench --device cuda --model $m --batch 64 --iters 20 --precision $prec
            echo "pytorch $m b64 $prec infer: $(python3 bench/torch_gpu_bench.py infer $m 64 224 20 $prec) s/batch"
        done
        "$evax" bench --device cuda --model s --batch 16 --iters 20 --precision $prec
        echo "pytorch s b16 $prec infer: $(python3 bench/torch_gpu_bench.py infer s 16 224 20 $prec) s/batch"
        "$evax" bench --device cuda --model s --batch 64 --iters 10 --train --precision $prec
        echo "pytorch s b64 $prec train: $(python3 bench/torch_gpu_bench.py train s 64 10 $prec) s/step"
    done
    "$evax" bench --device cuda --model s --batch 16 --iters 5 --cam
    fi
    if [[ " $parts " == *" demo "* ]]; then
    echo "== 3. a short fine-tuning run on the demo data, on the GPU"
    "$evax" demo --device cuda -o /tmp/evax-demo-gpu --epochs 6 2>&1 | grep -v "^\s*$" | tail -8
    "$evax" demo --device cuda --precision bf16 -o /tmp/evax-demo-gpu-bf16 --epochs 6 2>&1 |
        grep -v "^\s*$" | tail -3
    grep -h img_per_s /tmp/evax-demo-gpu/run/train_log.jsonl | tail -2
    fi
    echo "== done"
}

case "${1:-}" in
pack) shift; pack "$@" ;;
run) shift; run "$@" ;;
*)
    echo "usage: $0 pack|run" >&2
    exit 2
    ;;
esac
