#!/usr/bin/env bash
# The Hopper record of the kernels, one step per call of a lent GPU machine (each call at most 10 minutes):
#   record OUT             the GPU suite's Gluon tests (less single persistent programs), then
#                          bench/attention.py at the record's shapes
#   ab OUT PATCH.. [SHAPE..] this tree against a copy of its kernels/ per patch file (patches to kernels/ only;
#                            bench/ab.py --check, call by call), at the record's D=128 shapes unless given; each
#                            copy first passes the GPU tests that AB_TESTS selects (pytest -k, 150 s at most)
# Logs and JSON go to OUT. The Triton cache lives in .triton-cache (TRITON_CACHE_DIR) and comes back as
# OUT/triton-cache.tgz.00, .01, ... (a lent machine returns files of at most 16 MiB; none if over 45 MB in all):
# `cat OUT/triton-cache.tgz.* > .triton-cache.tgz` here and carry .triton-cache.tgz to the next call, which unpacks
# it and skips ~150 s of compiling.
# FOX_COMMIT names the commit in the JSON where the tree travels without its own .git.
#   bash bench/hopper_record.sh record "$OUT"
#   bash bench/hopper_record.sh ab "$OUT" .devrun/a.patch .devrun/b.patch 8x8192x16x128 16x4096x8x128
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?record or ab}
out=${2:?output folder}
mkdir -p "$out" .triton-cache
export PYTHONPATH="$PWD/src:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
record_shapes=(4x16384x24x64 8x8192x16x128 16x4096x12x64)

if [ -f .triton-cache.tgz ]; then
    tar -xzf .triton-cache.tgz -C "$TRITON_CACHE_DIR"
fi

keep_cache() {
    local whole
    whole=$(mktemp)
    tar -czf "$whole" -C "$TRITON_CACHE_DIR" .
    if [ "$(stat -c %s "$whole")" -le 45000000 ]; then
        split -b 15M -d "$whole" "$out/triton-cache.tgz."
    fi
    rm "$whole"
}
trap keep_cache EXIT

case $mode in
record)
    # the suite has its own time limit (it took 321 s on 2026-12-03), so that a hang still leaves the record its time
    timeout 400 python3 -m pytest -q -m gpu tests/test_kernels_gpu.py -k "gluon and not persistent1" \
        > "$out/gpu_tests.log" 2>&1 || echo "GPU suite failed or timed out: $out/gpu_tests.log"
    tail -3 "$out/gpu_tests.log"
    python3 bench/attention.py --shapes "${record_shapes[@]}" --gates sharp --no-others \
        --out "$out/attention.json" 2>&1 | tee "$out/attention.log" | tail -40
    ;;
ab)
    shift 2
    patches=()
    shapes=()
    for arg in "$@"; do
        if [ -f "$arg" ]; then patches+=("$(realpath "$arg")"); else shapes+=("$arg"); fi
    done
    [ ${#patches[@]} -gt 0 ] || { echo "ab: name at least one patch file" >&2; exit 2; }
    [ ${#shapes[@]} -gt 0 ] || shapes=(8x8192x16x128 16x4096x8x128)
    versions=()
    for patch_file in "${patches[@]}"; do
        # a Python identifier for ab.py: the file name less a leading date, in word characters
        name=$(basename "$patch_file" .patch | sed -E 's/^[0-9]{4}-[0-9]{2}-[0-9]{2}_//' | tr -c 'A-Za-z0-9_\n' _)
        [[ $name =~ ^[A-Za-z_] ]] || name=p_$name
        tree=$(mktemp -d)/$name
        mkdir -p "$tree"
        cp -r kernels "$tree/"
        (cd "$tree" && git apply "$patch_file")
        # the patched kernels first pass the GPU tests named by AB_TESTS (a pytest -k expression)
        PYTHONPATH="$tree/kernels:$PYTHONPATH" timeout 150 python3 -m pytest -q -m gpu tests/test_kernels_gpu.py \
            -k "${AB_TESTS:-gluon_persistent or gluon_acp}" > "$out/tests_$name.log" 2>&1 \
            || echo "GPU tests of $name failed or timed out: $out/tests_$name.log"
        tail -1 "$out/tests_$name.log"
        versions+=("$name=$tree")
    done
    python3 bench/ab.py --against "${versions[@]}" --shapes "${shapes[@]}" --gates sharp none --check \
        --out "$out/ab.json" 2>&1 | tee "$out/ab.log" | tail -40
    ;;
*)
    echo "unknown mode $mode: record or ab" >&2
    exit 2
    ;;
esac
