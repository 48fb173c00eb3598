#!/usr/bin/env bash
# The cuda target on an NVIDIA GPU (issue 7): for each ResNet-20 export, compile for cuda, validate the library on
# the GPU against the fake-quant reference and onnxruntime (all test images the export validated), then time it
# beside TVM's FP32 build on the same GPU and onnxruntime FP32 on this machine's CPU cores.
# Needs a CUDA GPU, nvcc and the export run folders (bench/compile_parity.py's: r20 = W8A8 int8 activations,
# r20u = W8A8 uint8 activations, r20w4 = W4A8). Results: runs/<run>/{validate,bench}/cuda/ and one JSON, $JSON.
#   bench/gpu_cuda.sh                 (RUNS="runs/r20 runs/r20u runs/r20w4", JSON=bench/results/gpu_cuda.json)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-"runs/r20 runs/r20u runs/r20w4"}
PLATEAU=${PLATEAU:-python3 -m plateau}
THREADS=${THREADS:-$(nproc)}
JSON=${JSON:-bench/results/gpu_cuda.json}
for r in $RUNS; do  # a run that fails is reported as such in $JSON; the others go on
  rm -rf "$r/compile/cuda" "$r/validate/cuda" "$r/bench/cuda"
  /usr/bin/time -f "compile %e s" $PLATEAU compile --run "$r" --target cuda &&
    $PLATEAU validate --run "$r" --target cuda &&
    $PLATEAU bench --run "$r" --target cuda --engines tvm-int8,tvm-fp32,ort-fp32 --threads "$THREADS" --batch 64 ||
    echo "gpu_cuda: $r failed"
done
python3 - "$JSON" $RUNS <<'EOF'
import json, subprocess, sys, time
from pathlib import Path

out, runs = Path(sys.argv[1]), sys.argv[2:]
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "gpu": smi, "nvcc": nvcc, "runs": {}}
for r in runs:
    if not (Path(r) / "bench/cuda/report.json").is_file():
        res["runs"][r] = {"error": "failed: see the log of bench/gpu_cuda.sh"}
        continue
    comp = json.loads((Path(r) / "compile/cuda/manifest.json").read_text())
    val = json.loads((Path(r) / "validate/cuda/report.json").read_text())
    ben = json.loads((Path(r) / "bench/cuda/report.json").read_text())
    res["runs"][r] = {
        "bits": val["bits"], "ops": comp["ops"], "dp4a": comp["device_source"].get("dp4a"),
        "validate": {k: val[k] for k in ("machine", "test_images", "top1", "device_vs_reference",
                                         "device_vs_onnxruntime", "output_step") if k in val},
        "bench": {"machine": ben["machine"], "threads": ben["threads"], "failed": ben["failed"],
                  "engines": [{k: e.get(k) for k in ("engine", "latency", "top1", "bytes")} for e in ben["engines"]]},
    }
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
EOF
