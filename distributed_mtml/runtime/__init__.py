"""What every command's run shares, below the recipes (`train/`, `meta/`, `transfer/`):

- `driver.py`      start or join Ray, check resources, create or resume the MLflow run, fit a
                   TorchTrainer, keep the best checkpoint, set the run's final status
- `callback.py`    the controller-side MLflow callback and the metric spool for tracking outages
- `checkpoint.py`  checkpoint files that load with `weights_only=True`, discovery and resume checks
- `monitor.py`     the kept model and early stopping (`checkpoint.monitor`)
- `placement.py`   which worker owns which tasks
- `worker.py`      what every worker loop does: merge metrics across ranks, quiet logs, optimisers
"""
