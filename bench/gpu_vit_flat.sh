#!/bin/bash
# The flat fine-tuning benchmark (bench/vit_flat.py) on the lent GPU machine (`run` tool; TVM is not needed):
#   carry: .device/cifar10-25k.npz (25,000 train + 10,000 test JPEGs of ../shared/data/cifar10, 2,500 per class)
#          .device/vit_tiny_c10.pt (../shared/models/cifar-vit)
# The package is laid out the way pyproject.toml maps it (plateau.train = train/, ...) in /tmp/pkg.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/pkg /tmp/cache
${PY:-python3} - <<'PY'
import numpy as np, os
z = np.load(".device/cifar10-25k.npz")
names, offsets, data = z["names"], z["offsets"], z["data"]
for i, name in enumerate(names):
    path = os.path.join("/tmp/cifar10", str(name))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data[offsets[i]:offsets[i + 1]].tobytes())
print(len(names), "images unpacked")
PY
cp -r plateau /tmp/pkg/
for s in train export compile runtime; do ln -sfn "$PWD/$s" /tmp/pkg/plateau/$s; done
export PYTHONPATH=/tmp/pkg PLATEAU_CACHE=/tmp/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
${PY:-python3} -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.is_available())"
${PY:-python3} bench/vit_flat.py --device ${DEVICE:-cuda} --data /tmp/cifar10 --ckpt .device/vit_tiny_c10.pt \
    --runs /tmp/runs --out "$OUT/vit_flat.json" "$@" 2>&1 | grep -v Warning
