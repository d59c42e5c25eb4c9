#!/usr/bin/env bash
# The sanitizer job and the fuzz smoke runs (issue 14), called by scripts/test.sh after ctest.
#
#   scripts/sanitize.sh              build ./build-asan (clang, ASan + UBSan, -O1, no CUDA, no
#                                    benches, with the libFuzzer harnesses; the test sources' own
#                                    code at -O0, half the build time), run the Catch2 unit tests
#                                    and the CLI tests under it, then each harness for FUZZ_SECONDS
#   FUZZ_SECONDS=600 scripts/sanitize.sh --fuzz-only    a longer local fuzzing run
#
# Installs clang and its runtime (Debian 12: clang, libclang-rt-14-dev) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
fuzz_only=0
[ "${1:-}" = "--fuzz-only" ] && fuzz_only=1

source scripts/apt.sh
apt_install_missing sanitize clang libclang-rt-14-dev

san="-fsanitize=address,undefined,fuzzer-no-link -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" -DCMAKE_CXX_FLAGS="$san" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DACTSIM_CUDA=OFF -DACTSIM_BUILD_BENCH=OFF -DACTSIM_FUZZ=ON -DACTSIM_TESTS_OPT=-O0 >/dev/null
cmake --build build-asan -j2

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export ACTSIM_SANITIZED=1   # tests that set an address-space limit skip that case (ASan reserves terabytes)

if [ $fuzz_only = 0 ]; then
  # The unit tests and the CLI tests; the PyTorch, browser, export and replay suites run in the
  # Release build only (minutes under ASan, and they exercise the same code).
  ctest --test-dir build-asan -j2 --output-on-failure -E "^(torch|export|replay|cuda|cli\.policies|cli\.golden)"
fi

# Seed corpus: the scenarios, and small schedules emitted by this build.
corpus=build-asan/fuzz-corpus
mkdir -p "$corpus/scenario" "$corpus/schedule"
cp scenarios/gpt2-small.toml scenarios/gpt2-xl.toml scenarios/llama-2-7b.toml scenarios/llama-3-8b.toml \
   scenarios/seed-gpt2-xl.toml "$corpus/scenario/"
small=(--set model.n_layers=1 --set model.d_model=8 --set model.n_heads=2 --set model.seq_len=4
       --set model.vocab_size=11 --set training.batch_size=1 --set runtime.profile=torch-cpu)
i=0
for extra in "model.family=gpt2" "model.family=llama" "checkpoint.policy=full" "model.dropout=0.1"; do
  i=$((i + 1))
  build-asan/tools/actsim simulate --no-fit "${small[@]}" --set "$extra" --emit-schedule "$corpus/schedule/s$i.jsonl" >/dev/null
  printf '[model]\nn_layers = 1\nd_model = 8\nn_heads = 2\nseq_len = 4\nvocab_size = 11\n[training]\nbatch_size = 1\n\0%s\n' \
    "$extra" > "$corpus/scenario/small$i.toml"
done

cp fuzz/seeds/*.jsonl "$corpus/schedule/"   # tiny hand-written schedules that replay

for h in scenario schedule; do
  echo "fuzz: fuzz_$h for ${FUZZ_SECONDS} s"
  mkdir -p "build-asan/fuzz-work/$h"
  build-asan/fuzz/fuzz_$h -max_total_time="$FUZZ_SECONDS" -max_len=200000 -rss_limit_mb=3072 -timeout=30 \
    -print_final_stats=1 -artifact_prefix="build-asan/fuzz-work/$h/" \
    "build-asan/fuzz-work/$h" "$corpus/$h" 2>&1 | grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==ERROR|SUMMARY|Done)" || true
  if ls "build-asan/fuzz-work/$h"/crash-* "build-asan/fuzz-work/$h"/leak-* "build-asan/fuzz-work/$h"/timeout-* >/dev/null 2>&1; then
    echo "fuzz: fuzz_$h found a failing input in build-asan/fuzz-work/$h/" >&2
    exit 1
  fi
done
echo "sanitize: passed"
