#!/usr/bin/env bash
# A prepared GPU check, under 6 minutes on one GPU: trains the medium trunk (4 x 1024) on the GPU
# (bf16 and fp32) and on the CPU with the same budget, meta-trains MAML on the sinusoid family on
# the GPU, prints samples/s side by side, and runs one elastic restart on the GPU (an elastic
# group of [1, 2] workers whose worker is killed mid-epoch and restarted from its checkpoint). Each leg's whole output goes to $LOGS/<leg>.log; a
# leg that fails prints its last lines and the others still run.
#   bash jobs/gpu_check.sh          (from the repository root, on a machine with one GPU)
#   LEGS='maml|elastic' bash jobs/gpu_check.sh   (only the legs whose names match)
set -uo pipefail
cd "$(dirname "$0")/.."
# A GPU machine without a package index can bring the dependencies on PYTHONPATH; the package
# then runs from this checkout (python -m distributed_mtml) without being installed.
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
PY=$(command -v python || command -v python3)  # GPU images may have python3 alone
$PY -c "import distributed_mtml" 2>/dev/null || $PY -m pip install -q -e . || exit 1
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 1
export MLFLOW_TRACKING_URI="sqlite:///$PWD/gpu_check.db"
LOGS=${LOGS:-$PWD/gpu_check_logs}
mkdir -p "$LOGS"
failed=0

leg() {  # leg NAME PATTERN ARGS...: run one mtml command, show the lines matching PATTERN
  local name=$1 pattern=$2; shift 2
  [[ $name =~ ${LEGS:-.} ]] || return 0
  echo "== $name"
  local start=$SECONDS
  if $PY -m distributed_mtml "$@" >"$LOGS/$name.log" 2>&1; then
    grep -E "$pattern" "$LOGS/$name.log"
    echo "   ($((SECONDS - start)) s wall)"
  else
    echo "   FAILED (exit $?); last lines of $LOGS/$name.log:"; tail -15 "$LOGS/$name.log"; failed=1
  fi
}

common=(--config jobs/configs/demo.yaml --set suite.options.rows=20000 --set model.trunk.widths=[1024,1024,1024,1024]
        --set training.epochs=3 --set training.batch_size=512 --set scaling.num_workers=1 --set checkpoint.dir=$PWD/gpu_check_runs)
leg train_gpu_bf16 "throughput|finished" train "${common[@]}" --set scaling.use_gpu=true --set training.precision=bf16
leg train_gpu_fp32 "throughput" train "${common[@]}" --set scaling.use_gpu=true
leg train_cpu "throughput" train "${common[@]}" --set scaling.cpus_per_worker=8
leg maml_gpu "tasks/s|finished" meta-train --config jobs/configs/sinusoid_maml.yaml --set meta.iterations=2000 \
  --set meta.report_every=1000 --set scaling.num_workers=1 --set scaling.use_gpu=true --set checkpoint.dir=$PWD/gpu_check_runs
# The worker killed (SIGKILL) at epoch 3, step 5: Ray Train restarts the elastic group from the
# last checkpoint it registered, on the GPU, and the run finishes as one MLflow run. (A kill in
# the first epochs can come before the controller has registered any checkpoint: the restarted
# worker then starts afresh and is killed again.)
MTML_FAULT=sigkill@3:5 leg elastic_restart_gpu "worker failure|epoch|finished" train "${common[@]}" \
  --set scaling.use_gpu=true --set "scaling.num_workers=[1,2]" --set training.epochs=5 --set checkpoint.every_n_epochs=1
exit $failed
