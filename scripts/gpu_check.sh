#!/usr/bin/env bash
# The GPU checks, in one go (about five minutes on an H100 or H200). From the repository root:
#     bash scripts/gpu_check.sh
# Runs the CUDA tests, `bench --device cuda` (the lecture's size and 4096 x 1024), the default
# 200,000-step run on CUDA timed, and the same run cut at step 120,050 and resumed, compared bit
# for bit with the straight one. Prints every figure with the issue's target beside it; exits
# non-zero if a part failed (the parts after it still run). PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
failed=()

part() { echo; echo "=== $*"; }
run() { "$PY" -m backprop_ninja "$@"; }
seconds() { "$PY" -c 'import time; print(f"{time.time():.3f}")'; }

part "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")'

part "CUDA tests (and the CPU-pinned bit-exact resume test)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    "tests/test_train.py::test_resume_equals_straight_and_runs_are_deterministic" || failed+=(tests)

part "bench --device cuda (targets: fast >= 15x autograd and >= 10x compiled-ro at 32 x 200;"\
     ">= 4x autograd and peak memory <= autograd's at 4096 x 1024)"
if run bench --device cuda --json > "$WORK/bench.json"; then
    "$PY" - "$WORK/bench.json" <<'EOF' || failed+=(bench-targets)
import json, sys
rows = json.load(open(sys.argv[1]))
ok = True
for batch in sorted({r["batch"] for r in rows}):
    by = {r["impl"]: r for r in rows if r["batch"] == batch}
    print(f"batch {batch}, {by['fast']['config'] or 'recipe'}:")
    for r in by.values():
        mem = "n/a" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.2f} MiB"
        print(f"  {r['impl']:<12} {r['us_per_step']:>10.1f} us  {r['ratio_vs_autograd']:>7.2f}x  {mem:>12}  {r['note']}")
    fast = by["fast"]
    vs_ro = by["compiled-ro"]["us_per_step"] / fast["us_per_step"]
    print(f"  fast vs compiled-ro: {vs_ro:.2f}x")
    if batch == 32:
        ok &= fast["ratio_vs_autograd"] >= 15 and vs_ro >= 10
    else:
        ok &= fast["ratio_vs_autograd"] >= 4 and (fast["peak_mem_bytes"] or 0) <= (by["autograd"]["peak_mem_bytes"] or 0)
print("targets", "met" if ok else "NOT met")
sys.exit(0 if ok else 1)
EOF
else
    failed+=(bench)
fi

part "the default run on CUDA (target: <= 25 s wall; CPU figures: train 2.0711, val 2.1119)"
t0=$(seconds)
run train -o "$WORK/straight" --device cuda --no-progress --num-samples 5 || failed+=(default-run)
t1=$(seconds)
"$PY" -c "print(f'wall: {$t1 - $t0:.1f} s')"
run eval -o "$WORK/straight" --device cuda --json || failed+=(eval)
run sample -o "$WORK/straight" --device cuda -n 5 --seed 1 || failed+=(sample)

part "cut at step 120050, resumed to 200000: bit for bit the straight run?"
run train -o "$WORK/cut" --device cuda --no-progress --num-samples 0 --steps 120050 > /dev/null &&
    run train -o "$WORK/cut" --resume --no-progress --num-samples 0 --steps 200000 > /dev/null ||
    failed+=(resume-run)
"$PY" - "$WORK/straight" "$WORK/cut" <<'EOF' || failed+=(resume-bits)
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file
a, b = (Path(p) for p in sys.argv[1:])
x, y = load_file(str(a / "checkpoint.safetensors")), load_file(str(b / "checkpoint.safetensors"))
diff = {k: (x[k].double() - y[k].double()).abs().max().item() for k in x if not torch.equal(x[k], y[k])}
same_metrics = (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
print("checkpoints bit-identical:", not diff and x.keys() == y.keys(), diff or "")
print("metrics.jsonl identical:", same_metrics)
sys.exit(0 if not diff and same_metrics else 1)
EOF

part "summary"
echo "work directory: $WORK"
if [ ${#failed[@]} -eq 0 ]; then echo "all parts passed"; else echo "FAILED: ${failed[*]}"; exit 1; fi
