#!/usr/bin/env bash
# Runtime stage on the pretrained CIFAR ResNet-20 (issue 6): validate on host and on arm64 under qemu, then the
# side-by-side latency benchmark on the host. Results land in runs/$RUN/validate/<target>/ and runs/$RUN/bench/host/.
#   bench/runtime_resnet20.sh            (RUN=rt20 by default; LIMIT=N validates on the first N test images)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-rt20}
CKPT=${CKPT:-/work/shared/models/cifar-resnet/resnet20-12fca82f.th}
DATA=${DATA:-/work/shared/data/cifar10}
if [ ! -f "runs/$RUN/export/manifest.json" ]; then
  make export RUN="$RUN" CKPT="$CKPT" MODEL=cifar_resnet20 DATA="$DATA"
fi
for t in host arm64; do
  [ -f "runs/$RUN/compile/$t/model.so" ] || make compile RUN="$RUN" TARGET=$t
done
time make validate RUN="$RUN" TARGET=host ${LIMIT:+LIMIT=$LIMIT}
time make validate RUN="$RUN" TARGET=arm64 ${LIMIT:+LIMIT=$LIMIT}
time make bench RUN="$RUN" TARGET=host
