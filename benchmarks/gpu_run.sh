#!/usr/bin/env bash
# The GPU checks of fqtc in one script (a CUDA machine with torch, triton and pytest-xdist installed; no network):
#   1. the kernel tests of tests/codegen compiled for the GPU (FQTC_TEST_DEVICE=cuda, tests/codegen/conftest.py);
#   2. benchmarks/gpu_check.py: CPU reference vs CUDA training trajectories, codegen counts, fallbacks;
#   3. `fqtc bench kernels`: analytic traffic and measured time / TFLOP/s of every kernel, beside cuBLAS baselines;
#   4. benchmarks/step_time.py --device cuda: fqt step time vs FP32 eager.
# Usage: benchmarks/gpu_run.sh OUTDIR   (each section has its own time limit; a failing section does not stop the rest)
set -u
OUT=${1:-/tmp/fqtc_gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
{
  nvidia-smi -L; $PY -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'python', platform.python_version(), torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.txt" 2>&1 || { echo "install failed"; tail -5 "$OUT/install.txt"; }
echo "== 1. kernel tests on the GPU"
FQTC_TEST_DEVICE=cuda timeout ${T_TESTS:-240} $PY -m pytest tests/codegen -q -n ${NPROC:-8} -p no:cacheprovider --maxfail=30 2>&1 | tee "$OUT/tests.txt" | tail -${TAIL_TESTS:-40}
echo "== 2. end to end: CPU reference vs CUDA"
timeout ${T_E2E:-150} $PY -m benchmarks.gpu_check --steps 6 --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.txt" | cut -c1-1500
echo "== 3. fqtc bench kernels"
timeout ${T_BENCH:-120} $PY -m fqtc.cli bench kernels 2>&1 | tee "$OUT/bench_kernels.txt"
timeout 60 $PY - <<'PYEOF' 2>&1 | tee -a "$OUT/bench_kernels.txt"
import torch, triton.testing as tt
print("cuBLAS baselines (same shapes): ms and TFLOP/s")
for M, N, K in [(4096, 4096, 4096), (8192, 11008, 4096), (16, 4096, 4096), (4096, 256, 4096)]:
    a, b = torch.randn(M, K, device="cuda", dtype=torch.bfloat16), torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    a8, b8 = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8), torch.randint(-127, 128, (K, N), device="cuda", dtype=torch.int8)
    row = f"{M}x{N}x{K}"
    for name, fn in [("bf16 mm", lambda: a @ b), ("int8 torch._int_mm", lambda: torch._int_mm(a8, b8) if M > 16 else None)]:
        try:
            t = tt.do_bench(fn)
            print(f"{name:22} {row:18} {t:8.3f} ms {2*M*N*K/t/1e9:8.1f} TFLOP/s")
        except Exception as e:
            print(f"{name:22} {row:18} failed: {type(e).__name__}: {str(e)[:100]}")
PYEOF
echo "== 4. step time"
timeout ${T_STEP:-150} $PY benchmarks/step_time.py --device cuda --models mlp --threads 1 --width 4096 --batch 4096 --steps 10 --out "$OUT" 2>&1 | tee "$OUT/step_time.txt" | tail -12
echo "== done"
