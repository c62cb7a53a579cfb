#!/usr/bin/env bash
# The fast recipes on one GPU, in at most 12 minutes: what the card is, the ANA/stock training
# step ratio, the resident loader against torch's DataLoader, and time to accuracy of the fast
# CNV recipes (W2A2 and W1A1, stock STE and default ANA: four runs sharing the card).
#
#   benchmarks/gpu_check.sh DATA_DIR [OUT] [MINUTES]
#
# DATA_DIR holds cifar-10-batches-py; OUT (default runs/gpu_check) receives every figure as a
# text file, the time-to-accuracy tables and plots; MINUTES (default 8) is each run's wall-time
# budget. Needs the project installed (pip install -e .) and a CUDA build of torch.
set -euo pipefail
DATA=${1:?usage: benchmarks/gpu_check.sh DATA_DIR [OUT] [MINUTES]}
OUT=${2:-runs/gpu_check}
MINUTES=${3:-8}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, brevitas; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'brevitas', brevitas.__version__, 'device', torch.cuda.get_device_name(0))"
  date -u; } 2>&1 | tee "$OUT/machine.txt"

# the card alone: the step ratio and the loader (about 3 minutes)
timeout 150 python benchmarks/bench_quantiser.py --bits 1 2 --noise uniform --repeats 9 \
    --profile --device cuda > "$OUT/step_ratio.txt" 2>&1 || echo "step ratio: exit $?" >> "$OUT/step_ratio.txt"
timeout 60 python benchmarks/bench_loader.py --device cuda --data-dir "$DATA" --workers 0 4 \
    > "$OUT/loader.txt" 2>&1 || echo "loader: exit $?" >> "$OUT/loader.txt"
# then time to accuracy: two benches of two runs each, four runs sharing the card
for bits in w2a2 w1a1; do
  python benchmarks/bench_time_to_accuracy.py --out "$OUT/tta_$bits" --bits "$bits" \
      --entries fast_ste fast_ana --minutes "$MINUTES" --jobs 2 --data-dir "$DATA" \
      > "$OUT/tta_$bits.txt" 2>&1 &
done

wait
tail -n 20 "$OUT"/*.txt
