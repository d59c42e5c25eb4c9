#!/usr/bin/env bash
# The GPU check of the CUDA backend (issue 6), in two halves:
#
#   scripts/gpu-check.sh --pack     # HERE (the build machine): after `cmake --build build` (binary build/tools/actsim), copy the
#                                   # binaries, their non-system shared libraries and the reference
#                                   # models into .gpu/ (ignored by git; about 15 MiB)
#   scripts/gpu-check.sh            # THERE (the lent GPU machine, carry .gpu): CUDA tests, the
#                                   # seven CUDA deltas of torch-cuda measured one by one, replay
#                                   # --confirm on gpt2-small and a llama, PyTorch comparison table
#
# Device tool call:  run(command="bash scripts/gpu-check.sh 2>&1 | tee $OUT/gpu-check.log",
#                        carry=[".gpu"], timeout_s=540)
# Set GPU_CHECK_QUICK=1 for batch 2 / two layers (a smoke run that takes about a minute).
# Set GPU_CHECK_DELTAS_ONLY=1 to measure only the CUDA deltas (torch-cuda = torch2-cpu + kDeltas of
# graph/src/profile.cpp; docs/torch-cuda-rules.md): PyTorch on the GPU, seconds, no actsim binary
# needed. The table "delta | expected | measured | confirmed?" is printed and written to the
# "deltas" key of $OUT/torch_cuda_check.json.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PACK=$ROOT/.gpu

if [[ "${1:-}" == "--pack" ]]; then
  BUILD=${BUILD:-$ROOT/build}
  rm -rf "$PACK" && mkdir -p "$PACK/bin" "$PACK/lib" "$PACK/reference"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  # The CUDA backend is a module beside actsim, loaded by `replay --backend cuda` (cuda_loader.cpp).
  bins=("$BUILD/tools/actsim" "$BUILD/tools/libactsim_cuda_module.so")
  for t in test_cuda_backend test_cuda_no_device test_cuda_ops; do
    f=$(find "$BUILD" -name "$t" -type f -perm -u+x | head -1)
    [[ -n "$f" ]] && bins+=("$f")
  done
  for b in "${bins[@]}"; do
    [[ -x "$b" ]] || { echo "gpu-check --pack: missing $b (build first)"; exit 2; }
    cp "$b" "$PACK/bin/"
    # Non-system libraries (fmt is shared-only on Debian; Boost, toml++ as built). The C/C++
    # runtime, the CUDA driver and cuBLAS come from the GPU machine (CUDA 13 there, as here).
    ldd "$b" | awk '/=> \// {print $3}' | grep -vE '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|ld-linux[^/]*|libcuda|libcublas[^/]*)\.so' \
      | while read -r lib; do cp -L "$lib" "$PACK/lib/"; done
  done
  cp ../shared/reference/*.py ../shared/reference/README.md "$PACK/reference/"
  du -sh "$PACK"; ls "$PACK/bin" "$PACK/lib"
  exit 0
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if [[ "${GPU_CHECK_DELTAS_ONLY:-0}" == 1 ]]; then
  echo; echo "== CUDA deltas of torch-cuda, measured with PyTorch on this GPU"
  timeout 300 python3 tests/cuda/torch_cuda_check.py --deltas-only --json "${OUT:-/tmp}/torch_cuda_check.json"
  rc=$?
  echo; echo "gpu-check (deltas only): $([[ $rc == 0 ]] && echo passed || echo "FAILED (exit $rc)")"
  exit $rc
fi
[[ -d "$PACK/bin" ]] || { echo "gpu-check: no .gpu/ (run scripts/gpu-check.sh --pack on the build machine and carry .gpu)"; exit 2; }
# cuBLAS 13: the toolkit's, else the one PyTorch's wheels ship.
CUBLAS_DIRS=/usr/local/cuda/lib64
PYCUBLAS=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null || true)
[[ -n "$PYCUBLAS" ]] && CUBLAS_DIRS="$CUBLAS_DIRS:$PYCUBLAS"
PYCU13=$(python3 -c 'import nvidia, os; p=os.path.join(list(nvidia.__path__)[0], "cu13", "lib"); print(p if os.path.isdir(p) else "")' 2>/dev/null || true)
[[ -n "$PYCU13" ]] && CUBLAS_DIRS="$CUBLAS_DIRS:$PYCU13"
export LD_LIBRARY_PATH="$PACK/lib:$CUBLAS_DIRS:${LD_LIBRARY_PATH:-}"
export ACTSIM_REFERENCE="$PACK/reference"
export PYTHONUNBUFFERED=1
A=$PACK/bin/actsim
status=0
step() { echo; echo "== $*"; }

step "binary loads"
ldd "$A" | grep -E "not found|cublas" ; "$A" --help >/dev/null || { echo "actsim does not run here"; exit 1; }

step "CUDA test programs"
for t in test_cuda_backend test_cuda_no_device test_cuda_ops; do
  [[ -x "$PACK/bin/$t" ]] || continue
  timeout 240 "$PACK/bin/$t"; rc=$?
  echo "-- $t: exit $rc"
  [[ $rc -eq 0 || $rc -eq 77 ]] || status=1
done

step "CUDA deltas (measured first), actsim replay --backend cuda --confirm, and PyTorch on the same GPU"
extra=()
[[ "${GPU_CHECK_QUICK:-0}" == 1 ]] && extra+=(--quick)
timeout 420 python3 tests/cuda/torch_cuda_check.py --actsim "$A" "${extra[@]}" --json "${OUT:-/tmp}/torch_cuda_check.json" || status=1

echo; echo "gpu-check: $([[ $status == 0 ]] && echo passed || echo FAILED)"
exit $status
