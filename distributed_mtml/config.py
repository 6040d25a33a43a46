"""Typed run configuration: YAML in, validated pydantic models out.

pydantic is the single source of truth: every default lives here, unknown keys are
errors, and `--set a.b=value` overrides are merged into the raw YAML before validation
so they get exactly the same checks as the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from distributed_mtml.errors import InputError, validation_lines


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SuiteConfig(_Section):
    """Where the task suite lives, or which generator makes it on first use."""

    path: str | None = Field(
        None, description="the suite's directory or URI (s3://, gs://, file://); a relative path is taken from the "
        "directory the command started in"
    )
    generator: str | None = Field(
        None, description="make the suite with this generator (data.generators.GENERATORS) on first use, into "
        "suite.path or else ./mtml_data/<generator>-<hash of the options>"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="the generator's options, e.g. {rows: 1000}")

    @model_validator(mode="after")
    def _path_or_generator(self) -> "SuiteConfig":
        if self.path is None and self.generator is None:
            raise ValueError("give 'path', 'generator', or both")
        return self

    def resolved_path(self) -> str:
        """An absolute location: workers chdir, so relative paths are resolved here, once."""
        if self.path is not None:
            return self.path if "://" in self.path else os.path.abspath(self.path)
        digest = hashlib.sha1(json.dumps(self.options, sort_keys=True).encode()).hexdigest()[:8]
        return os.path.abspath(os.path.join("mtml_data", f"{self.generator}-{digest}"))


def _option_of(registry: dict, choice: str, value: Any, info: ValidationInfo, default: Any) -> Any:
    """`value` of option `info.field_name`, unless it is set (not its default) while the entry
    the section's `choice` key names does not take it (its `params`): a ValueError naming the
    entry and the options it takes. An unknown entry is its own key's error."""
    entry = registry.get(info.data.get(choice))
    if entry is None or value == default or info.field_name in entry.params:
        return value
    taken = ", ".join(entry.params) or "none"
    raise ValueError(f"not an option of {choice} '{info.data[choice]}' (its options: {taken})")


class DataConfig(_Section):
    standardize: Literal["suite", "task", "off"] = Field(
        "suite", description="suite: each feature column (and regression target column) standardised with train-split "
        "statistics pooled over every task that reads it, so a feature constant within a task (a group-level "
        "covariate) keeps its between-task spread and targets keep their between-task means; task: each task by "
        "its own train split; off: raw units. Stored with the model (true/false: suite/off)"
    )

    @field_validator("standardize", mode="before")
    @classmethod
    def _booleans_of_older_configs(cls, value: Any) -> Any:
        """Configs and saved plans from before the modes said true/false."""
        return {True: "suite", False: "off"}.get(value, value) if isinstance(value, bool) else value
    impute: Literal["off", "mean"] = Field(
        "off", description="off: a missing (NaN or null) feature value in a labelled row is an error naming the "
        "column; mean: it is filled with the column's train mean (pooled as data.standardize pools), stored with "
        "the model so prediction fills alike. A missing target is never filled: that row is unlabelled for its task"
    )
    max_in_memory_mb: float = Field(
        1024, ge=0, description="a task whose train split is larger as float32 is streamed with Ray Data instead of "
        "loaded: 1 GiB, since a whole-table load holds the Arrow table, its numpy copy and the tensors at once "
        "(about 3x), which a worker of a few GiB still affords"
    )
    shuffle_buffer_rows: int = Field(
        65536, ge=1, description="rows in a streamed task's shuffle window (rounded up to whole batches)"
    )


class TrunkConfig(_Section):
    widths: list[int] = Field(default_factory=lambda: [100, 50], min_length=1, description="the trunk's layer widths")
    activation: Literal["relu", "gelu", "tanh", "silu"] = Field("relu", description="after each trunk layer")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after each trunk layer")
    layer_norm: bool = Field(False, description="LayerNorm after each trunk layer")
    passthrough: bool = Field(
        True, description="the trunk's output is its last layer's features next to its own input (wide and deep), "
        "so a head's last layer is also linear in the inputs: with head_penalty: em, the shared weights there are a "
        "mixed model's fixed effects and a task's offsets its random slopes (false: the heads read the last layer alone)"
    )


class ModelConfig(_Section):
    trunk: TrunkConfig = Field(default_factory=TrunkConfig)
    input_width: int | None = Field(
        None, ge=1, description="trunk input width; default: the tasks' common feature count"
    )
    head_hidden: list[int] = Field(default_factory=list, description="hidden widths of each task head")
    heads: str = Field(
        "shared_plus_offset", description="how task heads share (heads.HEADS): separate, shared_plus_offset (one head "
        "per task type plus a penalised per-task offset: partial pooling), task_embedding (one head per task type over "
        "the trunk's output and a learned task embedding)"
    )
    head_penalty: float | Literal["auto", "em"] = Field(
        "em", description="shared_plus_offset, task_embedding: L2 strength on each task's own head parameters "
        "(offsets, embedding), divided by its train rows: a mixed model's residual over between-task variance; "
        ".inf: one shared head, 0: free; auto: shared_plus_offset learns one strength after every epoch (least "
        "leave-one-out error over every task's train rows), task_embedding takes 10; em: shared_plus_offset solves "
        "the regression heads' last layer as a mixed model after every epoch: shared weights (fixed effects), a prior "
        "variance per input for the offsets (variance components) and one for the trunk's learned features, by EM"
    )
    embedding_dim: int = Field(8, ge=1, description="task_embedding: width of each task's embedding")
    architecture: str = Field(
        "hard", description="what tasks share under their heads (architectures.ARCHITECTURES): hard (one trunk), mmoe "
        "(shared experts of the trunk's shape and a softmax gate per task over them), cgc (mmoe's shared experts plus "
        "each task's own, a gate per task over both), ple (cgc levels stacked, one per model.trunk.widths entry, each "
        "expert one layer), cross_stitch (a column of the trunk's layers per task, mixed after every layer by a "
        "learned tasks x tasks matrix; up to 16 tasks)"
    )
    experts: int = Field(4, ge=1, description="mmoe, cgc, ple: shared experts, each a network of model.trunk's shape (ple: "
                         "of one level's width)")
    task_experts: int = Field(1, ge=1, description="cgc, ple: experts of each task's own beside the shared ones (ple: at every level)")

    @field_validator("head_penalty", mode="before")
    @classmethod
    def _penalty_number_or_auto(cls, value: Any) -> Any:
        if value in ("auto", "em"):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if isinstance(value, bool) or not number >= 0:
            raise ValueError(f"expected a number >= 0 (.inf: one shared head) or 'auto' or 'em', got {value!r}")
        return number

    @staticmethod
    def _registry(choice: str) -> dict:
        """The registry a `model` choice key names an entry of: `heads` or `architecture`."""
        from distributed_mtml.architectures import ARCHITECTURES
        from distributed_mtml.heads import HEADS

        return {"heads": HEADS, "architecture": ARCHITECTURES}[choice]

    @field_validator("head_penalty", "embedding_dim", "experts", "task_experts")
    @classmethod
    def _option_of_its_choice(cls, value: Any, info: ValidationInfo) -> Any:
        """An option set for a head kind or an architecture that does not take it is a mistake:
        named by its key (defaults pass, so dumped configs validate again)."""
        choice = "architecture" if info.field_name in ("experts", "task_experts") else "heads"
        return _option_of(cls._registry(choice), choice, value, info, cls.model_fields[info.field_name].default)

    @field_validator("heads", "architecture")
    @classmethod
    def _known_choice(cls, value: str, info: ValidationInfo) -> str:
        registry = cls._registry(info.field_name)
        if value not in registry:
            raise ValueError(f"unknown {info.field_name} '{value}' (choose from: {', '.join(registry)})")
        return value


class TrainingConfig(_Section):
    epochs: int = Field(10, ge=1, description="passes of steps_per_epoch steps")
    batch_size: int = Field(64, ge=1, description="rows per task per step")
    lr: float = Field(1e-3, gt=0, description="the optimiser's step size")
    weight_decay: float = Field(0.0, ge=0, description="the optimiser's weight decay")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="torch.optim's Adam, AdamW or SGD")
    seed: int = Field(0, description="weights, batches and dropout: the same seed on CPU gives the same metrics")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="default: enough steps for the largest task to see its train split once"
    )
    sync_every: int = Field(
        1, ge=1, description="local steps between trunk synchronisations (1 = DDP gradient sync every step)"
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: forward passes under torch.autocast (GPU mixed precision; also works on CPU)"
    )
    report_every_s: float = Field(
        10.0, ge=0, description="train: report to Ray Train (a ~1 s barrier) when this many seconds have passed; every "
        "epoch's metrics still reach MLflow at its own step (0: every epoch)"
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many reports (epochs; meta: reports) without a better checkpoint.monitor"
    )


AUTO_LOCAL_ROWS = 200_000  # `num_workers: auto`: up to this many train rows in all, local mode (see resolve_auto)
AUTO_WORKERS = 2  # and above it, this many workers


class ScalingSection(_Section):
    num_workers: int | list[int] | Literal["auto"] = Field(
        2, description="Ray Train workers, or [min, max]: elastic, starts with min and grows to max, shrinks on a lost node; "
        "0: in the command's own process (Ray Train's local mode), for small jobs; auto (mtml train): 0 up to "
        f"{AUTO_LOCAL_ROWS:,} train rows in all, else {AUTO_WORKERS} workers, said when chosen"
    )
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL between them")
    resource_wait_s: float = Field(
        300.0, ge=0, description="on a cluster: how long to wait for the workers' CPUs/GPUs (autoscaling) before failing"
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker, also its torch thread count")
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each worker also takes, e.g. {node_kind: 1}"
    )
    placement_strategy: Literal["PACK", "SPREAD"] = Field("PACK", description="Ray placement of the workers over nodes")
    resize_check_s: float = Field(60.0, gt=0, description="elastic: how often a running group checks for more workers")
    bucket_cap_mb: float = Field(25.0, gt=0, description="DDP gradient bucket size")
    grad_compression: Literal["none", "fp16", "bf16"] = Field(
        "none", description="DDP communication hook that compresses trunk gradients for the all-reduce"
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _one_of_its_forms(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "auto":
            raise ValueError(f"'{value}': a number of workers (0: in the command's own process), [min, max] or auto")
        return value

    @field_validator("num_workers")
    @classmethod
    def _count_or_range(cls, value: int | list[int] | str) -> int | list[int] | str:
        if value == "auto":
            return value
        if isinstance(value, int):
            if value < 0:
                raise ValueError("must be at least 0 (0: in the command's own process)")
            return value
        if len(value) != 2 or not 1 <= value[0] <= value[1]:
            raise ValueError(f"an elastic range is [min, max] with 1 <= min <= max, got {value}")
        return value

    def resolve_auto(self, train_rows: int) -> str | None:
        """`auto`: local mode for a suite of at most `AUTO_LOCAL_ROWS` train rows in all (tasks'
        rows summed), where starting workers costs more than they give back, else
        `AUTO_WORKERS` workers (always with GPUs: one each). Returns the line saying which."""
        if self.num_workers != "auto":
            return None
        small = train_rows <= AUTO_LOCAL_ROWS and not self.use_gpu
        self.num_workers = 0 if small else AUTO_WORKERS
        why = "GPUs asked for" if self.use_gpu else \
            f"{train_rows:,} train rows in all, {'at most' if small else 'more than'} {AUTO_LOCAL_ROWS:,}"
        return (f"[mtml] scaling.num_workers: auto -> {self.num_workers} "
                f"({'local mode, in this process' if small else 'Ray Train workers'}; {why})")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def local(self) -> bool:
        """0 workers: Ray Train's local mode, the training function in this process."""
        return self.num_workers == 0

    @property
    def min_workers(self) -> int:
        """The fewest ranks (local mode is one)."""
        return self.num_workers[0] if isinstance(self.num_workers, list) else max(1, self.num_workers)

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else max(1, self.num_workers)


class AggregationConfig(_Section):
    method: str = Field("mean", description="a name of aggregation.METHODS: mean, pcgrad, cagrad, mgda, upgrad, dualproj, "
                        "aligned_mtl, nash_mtl, fairgrad, config, gradvac, imtl, graddrop, uw, dwa, rlw, gls, stch, famo, gradnorm, db_mtl (docs: "
                        "reference/registries)")
    c: float = Field(0.4, ge=0, description="CAGrad's c: radius of the ball around the mean gradient")
    leak: float = Field(0.0, ge=0, le=1, description="GradDrop's leak: fraction of every gradient kept unmasked")
    temperature: float = Field(2.0, gt=0, description="DWA's softmax temperature T")
    reg_eps: float = Field(1e-4, ge=0, description="UPGrad's and DualProj's regularisation of the dual-cone projection "
                           "(added to the trace-normalised Gram's diagonal)")
    scale_mode: Literal["min", "median", "rmse"] = Field(
        "min", description="Aligned-MTL's scale: the smallest, median or mean nonzero eigenvalue of the Gram")
    max_norm: float = Field(1.0, ge=0, description="Nash-MTL's largest update norm (0: no clip)")
    fairgrad_alpha: float = Field(1.0, ge=0, description="FairGrad's alpha: 1 proportional fairness, larger favours "
                                  "the worst-off task, 0 the mean")
    gradvac_beta: float = Field(0.5, ge=0, le=1, description="GradVac's EMA rate of the target cosines")
    stch_mu: float = Field(1.0, gt=0, description="STCH's smoothing mu: small approaches the worst task alone")
    stch_warmup: int = Field(4, ge=0, description="STCH's epochs of log losses before the nadir point is measured")
    gradnorm_alpha: float = Field(1.5, ge=0, description="GradNorm's alpha: how hard tasks that train slowly are pushed")
    gradnorm_lr: float = Field(0.025, gt=0, description="GradNorm's step size for its task weights")
    db_beta: float = Field(0.9, ge=0, lt=1, description="DB-MTL's EMA rate of the task gradient sizes")
    famo_lr: float = Field(0.025, gt=0, description="FAMO's learning rate of the task-weight logits")
    famo_decay: float = Field(0.001, ge=0, description="FAMO's L2 decay of the task-weight logits")
    gradients: Literal["parameters", "representation"] = Field(
        "parameters", description="what a Gram method compares: each task's trunk-parameter gradient (one backward per "
        "task) or its gradient at the trunk's output (MGDA-UB: one trunk backward per step, whatever the task count)"
    )

    @field_validator("*")
    @classmethod
    def _option_of_the_method(cls, value: Any, info: ValidationInfo) -> Any:
        """An option set for a method that does not take it is a mistake (the user meant
        another method, or nothing happens): named by its key. Default values pass, so a dumped
        config (plans, checkpoints, which hold every key) validates again."""
        from distributed_mtml.aggregation import METHODS

        if info.field_name in ("method", "gradients"):
            return value
        return _option_of(METHODS, "method", value, info, cls.model_fields[info.field_name].default)

    @model_validator(mode="after")
    def _known_method(self) -> "AggregationConfig":
        from distributed_mtml.aggregation import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}' (choose from: {', '.join(METHODS)})")
        gram = [n for n, m in METHODS.items() if m.kind == "gram" and m.needs_exchange]
        if self.gradients == "representation" and self.method not in gram:
            raise ValueError(f"gradients: representation weighs tasks by a Gram matrix: a method of {', '.join(gram)}, "
                             f"not '{self.method}'")
        return self

    def resolved(self) -> "Method":  # noqa: F821 - aggregation.Method
        """The method's registry entry: looked up here once, passed on as the object."""
        from distributed_mtml.aggregation import METHODS

        return METHODS[self.method]

    def options(self) -> dict[str, Any]:
        """The method's own parameters, passed to its weights function."""
        return {key: getattr(self, key) for key in self.resolved().params}


class RelationsConfig(_Section):
    enabled: bool = Field(
        False, description="measure task relations during training: TAG's lookahead affinity and the gradient cosine"
    )
    every_n_steps: int = Field(10, ge=1, description="steps between affinity measurements")
    lr: float | None = Field(None, gt=0, description="lookahead step size; default training.lr")


class CheckpointSection(_Section):
    every_n_epochs: int | None = Field(
        None, ge=1, description="train: also checkpoint every this many epochs (a report then); default: at every report"
    )
    max_failures: int | None = Field(
        None, ge=-1, description="worker-group restarts before the run fails (-1: no limit); default 0, 3 if elastic"
    )
    num_to_keep: int = Field(2, ge=1, description="best checkpoints kept by checkpoint.monitor (the latest is kept too)")
    dir: str | None = Field(None, description="default: ./mtml_runs in the directory the command started in")
    monitor: str = Field("val/mean_loss", description="validation value that picks the kept model: val/mean_loss or val/<task>/<metric>")
    mode: Literal["min", "max"] = Field("min", description="min: lower monitor is better (losses); max: higher (accuracy, r2)")

    def resolved_dir(self) -> str:
        path = self.dir or "mtml_runs"
        return path if "://" in path else os.path.abspath(path)


class TrackingConfig(_Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default --tracking-uri, else $MLFLOW_TRACKING_URI, else mlflow.db in "
        "the directory the command started in"
    )
    experiment: str = Field("distributed-mtml", description="the MLflow experiment of train and meta-train runs")
    run_name: str | None = Field(
        None, description="the config's name (default: the config file's name): runs are named <it>-<6 hex> and "
        "tagged mtml.config_name; --resume and transfer.source look runs up by it"
    )
    transfer_experiment: str | None = Field(
        None, description="experiment of transfer and tune runs; default '<experiment>-transfer'"
    )
    task_metrics_limit: int | None = Field(
        None, ge=1, description="above this many tasks, per-task metrics go to Parquet tables (artifacts per_task/, a "
        "row per task) and MLflow holds their summaries across tasks, tasks/<prefix>/<metric>/<mean|median|p10|p90|"
        "worst>: a run page of thousands of tasks' keys stops answering. Default: when the per-task keys would pass "
        "80 (a regression task makes 17), so a run holds at most 100 keys"
    )

    def transfer_experiment_name(self) -> str:
        """Transfer and tune runs (and their many children) go apart from the training runs
        they start from, so those stay easy to compare."""
        return self.transfer_experiment or f"{self.experiment}-transfer"


class MetaConfig(_Section):
    algorithm: str = Field(
        "maml", description="a name from meta.algorithms.ALGORITHMS: maml (second order), fomaml, reptile, "
        "anil (heads only), metasgd (learned inner rates), ridge_head (regression: the last layer solved in closed form "
        "on the K rows, a Bayesian last layer with learned prior precisions); checked by mtml meta-train before Ray starts"
    )
    iterations: int = Field(1000, ge=1, description="outer (meta) updates")
    meta_batch_size: int = Field(25, ge=1, description="tasks per outer update, split over the workers")
    inner_steps: int = Field(1, ge=1, description="adaptation steps per task during meta-training")
    inner_lr: float = Field(0.01, gt=0, description="adaptation step size (Meta-SGD: ignored, rates are learned)")
    shots: int = Field(10, ge=1, description="support points per task (K)")
    query: int | None = Field(None, ge=1, description="query points per task; default: shots")
    outer_optimizer: Literal["adam", "sgd"] = Field("adam", description="optimiser of the outer update")
    outer_lr: float = Field(1e-3, gt=0, description="step size of the outer update")
    report_every: int = Field(500, ge=1, description="iterations between MLflow reports and checkpoints")
    val_tasks: int = Field(100, ge=1, description="validation episodes scored at every report")
    val_task_share: float = Field(
        0.2, ge=0, lt=1, description="share of a suite's tasks held out of meta-training (seeded by training.seed, at "
        "least one) whose episodes are the validation set: what a new task will see. Validating on the training "
        "tasks' own val rows rewards memorising them (a group-level feature names its group); 0 does that anyway"
    )

    def query_size(self) -> int:
        return self.query or self.shots




class TransferConfig(_Section):
    """Selection (ASHA, best setting, best strategy) sees the target's val split only; the
    numbers reported are its test split, scored once at the end of each fit."""

    @model_validator(mode="before")
    @classmethod
    def _no_eval_split(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "eval_split" in raw:
            raise ValueError("'eval_split' was removed: search and selection now use the target's val split "
                             "and reported numbers its test split; delete the key")
        return raw

    source: str | None = Field(
        None, description="a model: MLflow run id, runs:/<id>/model, models:/<name>/<version|@alias>, a checkpoint "
                          "directory, or the name of a finished run"
    )
    target: SuiteConfig | None = Field(None, description="the suite holding the target task (path or generator)")
    target_task: str | None = Field(None, description="the target task's name in that suite")
    shots: int = Field(10, ge=1, description="labelled target examples (K), drawn from its train split")
    strategies: list[str] | None = Field(
        None, min_length=1, description="names from transfer.strategies.STRATEGIES; default: every one of them"
    )
    steps: int = Field(100, ge=1, description="full-batch optimisation steps on the K examples")
    lr: float = Field(0.01, gt=0, description="Adam step size (meta_adapt: the source's inner rule instead)")
    eval_every: int = Field(10, ge=1, description="steps between validation scores: the learning curve and ASHA's rungs")
    partial_layers: int = Field(1, ge=1, description="partial: trunk layers (from the top) that train")
    adapter_width: int = Field(8, ge=1, description="adapter: bottleneck width of each residual adapter")
    seed: int = Field(0, description="initialisation and K-shot draw")


class TuneSection(_Section):
    num_samples: int = Field(4, ge=1, description="sampled settings per strategy (a training search: in all, or per grid point)")
    repeats: int = Field(3, ge=1, description="seeds (transfer: and K-shot resamples) of the best setting, the reported runs")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: fitted to the cluster's CPUs")
    cpus_per_trial: float = Field(0.5, gt=0, description="a trial trains in its own process with this CPU share")
    workers_per_trial: int = Field(
        1, ge=1, description="> 1: each trial is a TorchTrainer of this many workers (DDP over the K rows), for large targets"
    )
    grace_period: int = Field(2, ge=1, description="ASHA: evaluations (a training search: epochs) before a trial may be stopped")


class SearchSection(_Section):
    """`mtml tune` over the training itself (`search/`): which config keys vary and how."""

    algorithm: Literal["random", "optuna"] = Field(
        "random", description="random: Tune's sampling of the space; optuna: Optuna's TPE through Tune (pip extra 'search')"
    )
    space: dict[str, Any] = Field(
        min_length=1, description="config key -> a Tune domain, e.g. training.lr: {loguniform: [1e-4, 1e-2]}; kinds: "
                                  "choice, grid, uniform, loguniform, randint"
    )


class Config(_Section):
    @model_validator(mode="after")
    def _local_sgd_without_exchange(self) -> "Config":
        from distributed_mtml.aggregation import METHODS

        if self.training.sync_every > 1 and self.aggregation.resolved().needs_exchange:
            keeps_ddp = ", ".join(n for n, m in METHODS.items() if not m.needs_exchange)
            raise ValueError(f"training.sync_every > 1 (local SGD) works only with aggregation.method {keeps_ddp}")
        return self

    @model_validator(mode="after")
    def _restarts_of_an_elastic_run(self) -> "Config":
        """An elastic run exists to outlive lost workers, and Ray counts each loss as a failure:
        it gets 3 restarts unless the config says otherwise; a fixed-size run gets none."""
        if self.checkpoint.max_failures is None:
            self.checkpoint.max_failures = 3 if self.scaling.elastic else 0
        return self

    suite: SuiteConfig | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    relations: RelationsConfig = Field(default_factory=RelationsConfig)
    meta: MetaConfig = Field(default_factory=MetaConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    tune: TuneSection = Field(default_factory=TuneSection)
    search: SearchSection | None = None
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def config_of_older_plans(raw: Any) -> Any:
    """A saved plan's config as it was trained, where today's defaults differ from those it was
    saved under (plans hold every key, so a missing one means an older plan): no head kinds
    meant separate heads, no `model.trunk.passthrough` a plain trunk and the `auto` penalty (which
    a kind without a penalty no longer accepts, as it is no longer the default)."""
    from distributed_mtml.heads import HEADS

    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("trunk", {}), dict):
        return raw
    model = {"heads": "separate", **model}
    if "passthrough" not in model.get("trunk", {}):
        model["trunk"] = {**model.get("trunk", {}), "passthrough": False}
        kind = HEADS.get(model["heads"])
        if kind is not None and "head_penalty" in kind.params:
            model["head_penalty"] = model.get("head_penalty", "auto")
        else:
            model.pop("head_penalty", None)
    return {**raw, "model": model}


def apply_overrides(raw: dict[str, Any], overrides: list[str], where: str = "--set") -> dict[str, Any]:
    """Merges `a.b=value` strings into a raw config dict; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise InputError(f"{where} '{item}': expected key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InputError(f"{where} '{item}': '{part}' is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise InputError(f"{where} '{item}': the value is not valid YAML (a list is written [100, 50])") from None
    return raw


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    """Reads, overrides and validates a config file; every problem is an InputError line."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        raise InputError(f"{path}: line {mark.line + 1}, column {mark.column + 1}: {e.problem}") from None
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"{path}: cannot read: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of sections")
    overrides = overrides or []
    raw = apply_overrides(raw, overrides)
    blame = {item.split("=", 1)[0].strip(): f"--set {item}" for item in overrides}
    _note_boolean_standardize(raw, path)
    return validate_config(raw, where=path, blame=blame)


def _note_boolean_standardize(raw: dict[str, Any], path: str) -> None:
    """`data.standardize: true/false` still works; the user is told what it now means."""
    value = raw.get("data", {}).get("standardize") if isinstance(raw.get("data"), dict) else None
    if isinstance(value, bool):
        from distributed_mtml.console import say

        say(f"[mtml] note: {path}: data.standardize: {str(value).lower()} is read as "
            f"'{'suite' if value else 'off'}' (the modes are suite, task and off)")


def validate_config(raw: dict[str, Any], where: str = "config", blame: dict[str, str] | None = None) -> Config:
    """`blame`: dotted keys set on the command line -> what to name instead of `where`."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise InputError(validation_lines(where, e, blame)) from None


SECTIONS = {  # what each run command reads: only these become its MLflow params
    "train": ("suite", "data", "model", "training", "scaling", "aggregation", "relations", "checkpoint", "tracking"),
    "meta-train": ("suite", "data", "model", "training", "scaling", "meta", "checkpoint", "tracking"),
    "transfer": ("data", "transfer", "tracking"),
    "tune": ("data", "transfer", "tune", "checkpoint", "tracking"),
}


def run_params(config: Config, command: str) -> dict[str, Any]:
    """The flattened config sections `command` uses (a train run carries no `meta.*`)."""
    dumped = config.model_dump(mode="json")
    return flatten({k: dumped[k] for k in SECTIONS[command] if dumped.get(k) is not None})


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: MLflow params are flat."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
