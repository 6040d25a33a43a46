#!/usr/bin/env bash
# A prepared GPU check, under 5 minutes on one GPU: installs this package, trains the medium
# trunk (4 x 1024) on the GPU and on the CPU with the same budget, meta-trains MAML on the
# sinusoid family on the GPU, and prints samples/s side by side.
#   bash jobs/gpu_check.sh          (from the repository root, on a machine with one GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e . 2>&1 | tail -1 || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0))"
export MLFLOW_TRACKING_URI="sqlite:///$PWD/gpu_check.db"
common=(--config jobs/configs/demo.yaml --set suite.options.rows=20000 --set model.trunk.widths=[1024,1024,1024,1024]
        --set training.epochs=3 --set training.batch_size=512 --set scaling.num_workers=1 --set checkpoint.dir=$PWD/gpu_check_runs)
echo "== medium trunk, 1 worker, GPU (bf16)"
mtml train "${common[@]}" --set scaling.use_gpu=true --set training.precision=bf16 | tee /tmp/gpu_train.txt | grep -E "samples/s|throughput"
echo "== medium trunk, 1 worker, GPU (fp32)"
mtml train "${common[@]}" --set scaling.use_gpu=true | grep -E "throughput"
echo "== medium trunk, 1 worker, CPU"
mtml train "${common[@]}" --set scaling.cpus_per_worker=8 | grep -E "throughput"
echo "== MAML on the sinusoid family, GPU, 2000 iterations"
mtml meta-train --config jobs/configs/sinusoid_maml.yaml --set meta.iterations=2000 --set meta.report_every=1000 \
  --set scaling.num_workers=1 --set scaling.use_gpu=true --set checkpoint.dir=$PWD/gpu_check_runs | grep -E "tasks/s|finished"
