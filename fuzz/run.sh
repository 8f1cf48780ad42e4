#!/usr/bin/env bash
# Runs the cargo-fuzz targets one after another, each for FUZZ_SECONDS
# (default 600), at low CPU priority, and prints a table of executions,
# exec/s and crashes. Used by `make fuzz` and `make fuzz-smoke`.
#
#   FUZZ_SECONDS     seconds per target (default 600)
#   FUZZ_TARGETS     targets to run (default: all of them)
#   FUZZ_TARGET_DIR  cargo target dir (default fuzz/target)
#   FUZZ_SANITIZER   none (default: Herald forbids unsafe) or address
#
# Works on a stable toolchain: cargo-fuzz passes -Z flags to rustc, which
# RUSTC_BOOTSTRAP=1 allows. Corpora grow in fuzz/corpus/<target> (not in
# git; fuzz/seeds/<target> are the committed starting inputs), crashing
# inputs land in fuzz/artifacts/<target>, logs in fuzz/logs.
set -uo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-600}
sanitizer=${FUZZ_SANITIZER:-none}
target_dir=${FUZZ_TARGET_DIR:-target}
targets=${FUZZ_TARGETS:-stream_event capture_events l1_message ws_frames cache_api_http jwt config_load pgoutput}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked || exit 1
fi

build=(--sanitizer "$sanitizer" --debug-assertions --target-dir "$target_dir")
nice -n 19 cargo fuzz build "${build[@]}" || exit 1

mkdir -p logs
summary=$(printf '%-16s %8s %12s %8s %8s\n' target seconds executions exec/s crashes)
failed=0
for t in $targets; do
    mkdir -p "corpus/$t" "seeds/$t"
    before=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
    echo "== $t: ${seconds}s" >&2
    started=$(date +%s)
    # One process (no -jobs/-workers): other work shares this machine.
    nice -n 19 cargo fuzz run "${build[@]}" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 2>&1 | tee "logs/$t.log" | grep -E '^#[0-9]+.*(pulse|DONE)|^(==|SUMMARY|Done)' >&2
    status=${PIPESTATUS[0]}
    # Wall time: shorter than asked when the target crashed.
    ran=$(($(date +%s) - started))
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "logs/$t.log" | grep -oE '[0-9]+$' | tail -1)
    rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "logs/$t.log" | grep -oE '[0-9]+$' | tail -1)
    after=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
    crashes=$((after - before))
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes="err"; fi
    [ "$status" -ne 0 ] && failed=1
    summary+=$(printf '\n%-16s %8s %12s %8s %8s' "$t" "$ran" "${runs:-?}" "${rate:-?}" "$crashes")
done
echo "$summary"
if [ "$failed" -ne 0 ]; then
    echo "a target failed: see fuzz/logs and fuzz/artifacts" >&2
    exit 1
fi
