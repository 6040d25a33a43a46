"""Meta-learning: a trunk and head initialisation that adapt to a new task in a few steps.

- `tasks.py`       where episodes (support + query sets) come from: a procedural family or a suite
- `algorithms.py`  MAML, first-order MAML, Reptile, ANIL, Meta-SGD on `torch.func`, batched over tasks
- `plan.py`        the driver's checks before Ray starts
- `worker.py`      the Ray Train loop: each rank adapts its share of the meta-batch, one all-reduce
- `launch.py`      `mtml meta-train`: MLflow run, TorchTrainer, model artifact
- `evaluate.py`    the few-shot protocol: adapt to held-out tasks, loss after 0..N steps with a 95% CI
"""
