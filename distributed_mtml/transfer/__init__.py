"""Transfer to a new task: strategies that carry a trained (or meta-learned) model to a target
task from K labelled examples, run one by one (`mtml transfer`) or searched by Ray Tune
(`mtml tune`).

- `source.py`      the source model and the target task's K-shot and evaluation data
- `strategies.py`  what each strategy builds and which parameters it trains
- `fit.py`         the K-shot training loop with its learning curve
- `run.py`         `mtml transfer`: every configured strategy, a child MLflow run each
- `search.py`      `mtml tune`: ASHA search per strategy, then repeats of the best settings
"""
