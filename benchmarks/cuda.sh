#!/bin/bash
# The CUDA path of the local engine, checked and timed on a machine with a GPU.
#
#   bash benchmarks/cuda.sh OUTDIR
#
# 1. the CUDA test of the suite (tests/test_local.py::test_cuda_workers, skipped
#    without a GPU);
# 2. the thesis MLP, ADAG n=4 λ=8, 2 epochs of MNIST on `--engine local`, workers on
#    cuda and then on cpu (one torch thread each), same seed: throughput and accuracy
#    from each run's summary.json, and their ratio, in OUTDIR/cuda.md.
set -u -o pipefail
out=${1:?usage: bash benchmarks/cuda.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"
timeout 240 $py -m pytest -q -p no:cacheprovider tests/test_local.py -k cuda -rs 2>&1 | tee "$out/cuda-test.log"
test_rc=$?
for dev in cuda cpu; do
    timeout 200 $py -m distgrad train --engine local --device $dev --algorithm adag --workers 4 \
        --window 8 --epochs 2 --seed 1 --threads 1 --out "$out/run-$dev" --overwrite -q \
        2>&1 | tail -n 5
done
$py - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows, rate = [], {}
for dev in ("cuda", "cpu"):
    f = out / f"run-{dev}" / "summary.json"
    if not f.exists():
        rows.append(f"| {dev} | (no summary: the run failed) | | |")
        continue
    s = json.loads(f.read_text())
    rate[dev] = s["samples_per_second"]
    rows.append(f"| {dev} | {s['samples_per_second']:.0f} | {s['wall_seconds']:.1f} | "
                f"{s['test_accuracy']:.4f} |")
text = ["| workers on | samples/s | wall s | test accuracy |", "|---|---:|---:|---:|", *rows]
if len(rate) == 2:
    text.append(f"\ncuda / cpu throughput: {rate['cuda'] / rate['cpu']:.2f}x")
(out / "cuda.md").write_text("\n".join(text) + "\n")
print("\n".join(text))
PY
exit $test_rc
