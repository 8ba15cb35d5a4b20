#!/usr/bin/env bash
# Fuzzing on the stable toolchain (cargo-fuzz with libFuzzer, no sanitizer):
# replays every input that once broke a target (fuzz/regressions), then runs
# each target for a bounded time from the committed corpus.
#   bash fuzz/smoke.sh            # 20 s per target (CI)
#   FUZZ_SECONDS=600 FUZZ_BUILD=-O bash fuzz/smoke.sh   # a longer local run
#   FUZZ_CORPUS=sample bash fuzz/smoke.sh  # start from ~1 in 20 corpus inputs (CI)
# CI builds unoptimized (--dev): 2m20s instead of 5m45s on 2 cores, and a
# 20 s run is about finding a regression, not about executions per second.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${FUZZ_SECONDS:-20}
# libFuzzer runs every corpus input before its clock starts: 13,000 inputs
# through an unoptimised build take ~10 min. A sample (every 20th saved
# input, by name, so each run starts alike, and every hand-written seed;
# corpora under 1,000 inputs whole) keeps a smoke run to seconds.
CORPUS=${FUZZ_CORPUS:-all}
BUILD=${FUZZ_BUILD:---dev}
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi
targets=(config route_table headers framing)
cargo fuzz build -s none "$BUILD"
for t in "${targets[@]}"; do
  if [ -d "fuzz/regressions/$t" ]; then
    cargo fuzz run -s none "$BUILD" "$t" fuzz/regressions/"$t"/* -- -runs=1 >/dev/null 2>&1 \
      || { echo "fuzz: a known crash of $t is back"; cargo fuzz run -s none "$BUILD" "$t" fuzz/regressions/"$t"/*; exit 1; }
  fi
  # Work on a copy of the corpus: a smoke run adds nothing to the repository.
  work=$(mktemp -d)
  mapfile -d '' inputs < <(find "fuzz/corpus/$t" -type f -print0 | sort -z)
  if [ "$CORPUS" = sample ] && [ ${#inputs[@]} -gt 1000 ]; then
    # Every 20th input libFuzzer saved (named by hash), and every seed
    # written by hand (any other name: the smuggling cases, say).
    i=0
    for f in "${inputs[@]}"; do
      if ! [[ $(basename "$f") =~ ^[0-9a-f]{40}$ ]] || ((i++ % 20 == 0)); then
        cp -- "$f" "$work/"
      fi
    done
  else
    cp -r "fuzz/corpus/$t/." "$work/"
  fi
  echo "fuzz: $t for ${SECONDS_PER_TARGET}s"
  log="$work.log"
  if ! cargo fuzz run -s none "$BUILD" "$t" "$work" -- -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 >"$log" 2>&1; then
    grep -E -A20 "panicked|SUMMARY" "$log" | head -60
    echo "fuzz: $t failed (input saved under fuzz/artifacts/$t)"
    exit 1
  fi
  grep -E "stat::number_of_executed_units" "$log" || true
  rm -rf "$work"
done
echo "fuzz: all targets clean"
