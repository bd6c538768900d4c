#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run: the Triton kernels for real (no interpreter), the compile tests,
# dequant-matmul against bf16 torch.mm, a 1B-shape step and the 7B memory timeline, all on the GPU.
#
#   bash benchmarks/gpu_checks.sh                # results under $OUT (default benchmarks/results/gpu)
#   QUICK=1 bash benchmarks/gpu_checks.sh        # kernel tests + matmul only (a few minutes)
#
# It uses the python on PATH (a venv with the project installed: `pip install -e ".[dev]"` after the CUDA
# torch build the machine needs). Each part writes its own log; a failing part does not stop the others, and
# the script's exit status is the number of parts that failed. QGALORE_FX_REFERENCE=1 in the environment
# forces the torch references everywhere (the fallback for a GPU where a Triton kernel misbehaves).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
failed=0

part() {  # part NAME COMMAND...: run one part, its output in $OUT/NAME.log
    local name=$1; shift
    echo "== $name: $*"
    if "$@" >"$OUT/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $OUT/$name.log)"; failed=$((failed + 1)); fi
    tail -n 15 "$OUT/$name.log"
}

python - <<'EOF' | tee "$OUT/device.txt"
import torch, platform
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| python", platform.python_version())
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

# 1. Kernels: conftest only sets TRITON_INTERPRET=1 without CUDA, so here the Triton kernels run for real.
part kernel-tests python -m pytest -q tests/test_quant_triton.py tests/test_int8_matmul.py tests/test_quant.py \
    tests/test_adam8bit.py tests/test_moments.py
# 2. Dequant-matmul vs bf16 torch.mm at the 7B attention shape.
part matmul-4096 python benchmarks/bench_matmul.py --device cuda --size 4096 --tokens 4096 --out "$OUT/matmul-4096.json"
part matmul-4096-reference env QGALORE_FX_REFERENCE=1 python benchmarks/bench_matmul.py --device cuda --size 4096 \
    --tokens 4096 --out "$OUT/matmul-4096-reference.json"
if [ -z "${QUICK:-}" ]; then
    # 3. Compile and the update inside the compiled backward; the rest of the suite on a GPU machine.
    part compile-tests python -m pytest -q tests/test_compile.py tests/test_update.py tests/test_host_sync.py \
        tests/test_memory.py
    # 4. Step time and peak memory at the 1B shape on the GPU, phase by phase (bench_speed.py, the same-run
    #    comparison with AdamW / AdamW8bit / galore-torch, measures on the CPU only so far).
    part step-1b python benchmarks/bench_memory_timeline.py --preset 1b --steps 5 --device cuda \
        --out "$OUT/step-1b.json"
    # 5. Peak memory of LLaMA-7B steps (max_memory_allocated is in the JSON's memory report on CUDA).
    part memory-7b python benchmarks/bench_memory_timeline.py --preset 7b --steps 3 --rest-in-backward \
        --device cuda --out "$OUT/memory-7b.json"
fi
echo "parts failed: $failed (logs in $OUT)"
exit "$failed"
