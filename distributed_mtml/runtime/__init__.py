"""What every command's run shares, below the recipes (`train/`, `meta/`, `transfer/`):

- `driver.py`      a training command's run from start to final status, through the modules below
- `cluster.py`     start or join Ray; the workers' resources checked before and watched during the run
- `mlflow_run.py`  the run's MLflow record: created or resumed, files and datasets, unsent metrics
- `trainer.py`     the TorchTrainer (or local mode), its failures in one line, the kept checkpoint
- `callback.py`    the controller-side MLflow callback and the metric spool for tracking outages
- `checkpoint.py`  checkpoint files that load with `weights_only=True`, discovery and resume checks
- `local.py`       local mode's stand-in for the controller: logging and keeping checkpoints
- `monitor.py`     the kept model and early stopping (`checkpoint.monitor`)
- `placement.py`   which worker owns which tasks
- `worker.py`      what every worker loop does: merge metrics across ranks, optimisers
"""
