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
    part memory-7b python benchmarks/bench_memory_timeline.py --preset 7b --steps 3 \
        --device cuda --out "$OUT/memory-7b.json"
fi
# 6. FSDP2 on CUDA with nccl (one GPU: a world of one; CPU/gloo covers 2 and 4 ranks in tests/test_fsdp.py), and
#    FSDP1's refusal, which needs an accelerator to build a FullyShardedDataParallel at all.
cat >"$OUT/fsdp_cuda.py" <<'EOF2'
import os, sys
import torch, torch.distributed as dist
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from conftest import tiny_llama
import qgalore_fx
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
dist.init_process_group("nccl")
torch.cuda.set_device(0)
model = qgalore_fx.transform(tiny_llama(hidden=128, intermediate=256, vocab=256).cuda(), rank=16)
for block in model.model.layers:
    fully_shard(block)
fully_shard(model)
opt = qgalore_fx.optimizer(model, lr=1e-2)
ids = torch.randint(0, 256, (4, 16), device="cuda")
for step in range(3):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad()
    print("fsdp2 cuda step", step, float(loss))
other = FullyShardedDataParallel(qgalore_fx.transform(tiny_llama().cuda(), rank=8), use_orig_params=True)
try:
    qgalore_fx.optimizer(other, lr=1e-3)
    raise SystemExit("FSDP1 was not refused")
except ValueError as e:
    assert "FSDP1" in str(e), e
    print("FSDP1 refused:", str(e)[:80])
dist.destroy_process_group()
EOF2
part fsdp-cuda torchrun --nproc-per-node 1 "$OUT/fsdp_cuda.py"
# 7. transformers' from_pretrained(quantization_config=QGaLoreQuantizationConfig) onto the GPU: a 117M fp32
#    checkpoint, plain vs straight into INT8, with torch.cuda.max_memory_allocated; and the matmul floor the
#    step-time figures are read against (bench_peers prints it beside each measured ratio).
part hf-load-cuda python benchmarks/bench_hf_load.py --device cuda:0 --dir "$OUT/hf-load-117m"
part floor python -m qgalore_fx.app.floor --preset 1b --batch-size 1 4 --checkpointing
echo "parts failed: $failed (logs in $OUT)"
exit "$failed"
