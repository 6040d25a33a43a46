"""Synthetic task suites with known structure, so that sharing, relations and transfer
can be checked against a ground truth.

Each generator is a registry entry: a function of a typed options model. The CLI builds
`mtml data make NAME --option ...` from those models, so the help never drifts from the code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distributed_mtml.data.suite import SPLIT_FRACTIONS, SuiteSpec, TaskSpec, write_suite
from distributed_mtml.errors import InputError, validation_lines


class _SuiteOptions(BaseModel):
    """Options every generator takes: size, split and seed."""

    model_config = ConfigDict(extra="forbid")
    rows: int = Field(2000, ge=20, description="rows per task (all splits)")
    train_rows: int | None = Field(
        None, ge=1, description="rows in the train split (rest halved into val and test); default 70%%"
    )
    seed: int = Field(0, description="random seed")

    @model_validator(mode="after")
    def _train_fits(self) -> "_SuiteOptions":
        if self.train_rows is not None and self.rows - self.train_rows < 2:
            raise ValueError(f"train_rows ({self.train_rows}) must leave at least 2 of {self.rows} rows for val and test")
        return self


class SeedExampleOptions(_SuiteOptions):
    noise: float = Field(0.1, ge=0, description="noise added to the latent signal")
    variant: int = Field(
        0, ge=0, description="> 0: new task readouts and rows on the same latent map (a held-out variant of seed)"
    )


class MMoEOptions(_SuiteOptions):
    tasks: int = Field(2, ge=2, description="number of regression tasks")
    groups: int = Field(1, ge=1, description="task groups: correlation within a group, 0 across groups")
    correlation: float = Field(
        0.9, ge=-1, le=1, description="pairwise cosine of the task weight vectors; >= -1/(n-1) for a group of n tasks"
    )
    features: int = Field(16, ge=3, description="input width d")
    scale: float = Field(1.0, gt=0, description="scale c of the weight vectors")
    sines: int = Field(10, ge=0, description="number m of sine terms")
    noise: float = Field(0.01, ge=0, description="label noise standard deviation")


class SinusoidOptions(_SuiteOptions):
    tasks: int = Field(20, ge=1, description="number of sinusoid tasks")
    rows: int = Field(100, ge=20, description="points per task (all splits)")


class MultilevelOptions(_SuiteOptions):
    rows: int = Field(30, ge=5, description="rows per group (all splits)")
    groups: int = Field(50, ge=2, description="number of groups G: one regression task each")
    features: int = Field(3, ge=1, description="row-level features x1..xp (x1 has a random slope)")
    group_features: int = Field(2, ge=0, description="group-level covariates z1..zq, constant within a group")
    noise: float = Field(1.0, gt=0, description="residual standard deviation (sigma)")
    between: float = Field(
        0.3, ge=0, lt=1, description="share of the non-fixed variance that lies between groups: random intercept and "
        "slope variance over that plus sigma^2"
    )
    one_table: bool = Field(False, description="one table schools.parquet with a group column 'school' (one suite entry "
                            "with group_column) instead of a file per group")


def _split_column(opts: _SuiteOptions, rng: np.random.Generator, rows: int) -> pa.Array:
    """A chunk of `rows` rows' split labels: the suite's train share of them, the rest halved."""
    share = opts.train_rows / opts.rows if opts.train_rows is not None else SPLIT_FRACTIONS[0]
    n_train = opts.train_rows if rows == opts.rows and opts.train_rows is not None else int(rows * share)
    n_val = (rows - n_train) // 2
    labels = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * (rows - n_train - n_val))
    rng.shuffle(labels)
    return pa.array(labels)


def _table(x: np.ndarray, y: np.ndarray, split: pa.Array, prefix: str = "x") -> pa.Table:
    cols = {f"{prefix}{i}": pa.array(x[:, i].astype(np.float32)) for i in range(x.shape[1])}
    cols["y"] = pa.array(y)
    cols["split"] = split
    return pa.table(cols)


LATENT = 2
Drawn = tuple[SuiteSpec, dict[str, pa.Table]]
GENERATE_CHUNK_ROWS = 1 << 19  # rows per task drawn and written at a time: ~70 MB for 16 features


def seed_example(opts: SeedExampleOptions, rng: np.random.Generator, rows: int, state: dict) -> Drawn:
    """The founding article's example: 10 features, a 2-class task and a regression task.

    Both targets are read off one hidden representation h = tanh(A x) (4 units): the
    regression target is a score s(h) = w.h + sin(2 h_0) plus a task-specific part, and the
    class is whether s(h) is positive. A trunk that learns h from either task's data helps
    the other, most when each task has few rows; each task draws its own x.
    A `variant` keeps the latent map A of its seed and draws new readouts w, v and new rows:
    new tasks on the same hidden structure, the case transfer is for.
    """
    chunk = state["chunk"] = state.get("chunk", -1) + 1
    if chunk == 0:
        state["a"] = rng.normal(size=(LATENT, 10)) / math.sqrt(10) * 2.0
    if opts.variant:  # its own readouts and rows, chunk by chunk
        rng = np.random.default_rng([opts.seed, opts.variant, *([chunk] if chunk else [])])
    if chunk == 0:
        state["w"], state["v"] = rng.normal(size=LATENT), rng.normal(size=LATENT)
    a, w, v = state["a"], state["w"], state["v"]

    def latent(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, 10))
        h = np.tanh(x @ a.T) + opts.noise * rng.normal(size=(n, LATENT))
        return x, h, h @ w + np.sin(2.0 * h[:, 0])

    x_c, _, score_c = latent(rows)
    label = (score_c > 0).astype(np.int64)
    x_r, h_r, score_r = latent(rows)
    target = (score_r + 0.5 * h_r @ v).astype(np.float32)
    tables = {
        "classify": _table(x_c, label, _split_column(opts, rng, rows)),
        "regress": _table(x_r, target, _split_column(opts, rng, rows)),
    }
    spec = SuiteSpec(
        name="seed-example",
        description="article example: 2-class classification and regression on shared latent structure",
        tasks=[
            TaskSpec(name="classify", type="classification", path="classify.parquet", target="y", num_classes=2),
            TaskSpec(name="regress", type="regression", path="regress.parquet", target="y"),
        ],
    )
    return spec, tables


def mmoe(opts: MMoEOptions, rng: np.random.Generator, rows: int, state: dict) -> Drawn:
    """K regression tasks after the MMoE paper's synthetic procedure.

    Weight vectors w_k = c(sqrt(p) a_g + sqrt(1-p) u_k) over orthonormal directions give every
    pair of tasks in the same group g cosine exactly p (the paper's two-task formula gives p^2
    for K>2) and tasks of different groups cosine 0: a known grouping to test affinity against.
    Negative p (conflicting tasks) takes w_k = c(a u_k + b sum_{j in g} u_j) with a = sqrt(1-p)
    and b the root of n b^2 + 2ab - p = 0 for a group of n tasks: again unit norm and cosine p,
    which exists down to p = -1/(n-1).
    Labels: y = w^T x + sum_i sin(alpha_i w^T x + beta_i) + noise, alpha_i = i, beta_i = (i-1)^2.
    """
    if opts.tasks + opts.groups > opts.features:
        raise InputError(
            f"mmoe: option 'features' ({opts.features}) must be at least 'tasks' + 'groups' ({opts.tasks + opts.groups})"
        )
    group_of = [k * opts.groups // opts.tasks for k in range(opts.tasks)]
    largest = max(group_of.count(g) for g in set(group_of))
    p = opts.correlation
    if largest > 1 and p < -1 / (largest - 1):
        raise InputError(f"mmoe: option 'correlation' ({p}) must be at least -1/(n-1) for groups of n={largest} tasks")
    if not state:
        state["basis"] = np.linalg.qr(rng.normal(size=(opts.features, opts.tasks + opts.groups)))[0]
    basis = state["basis"]
    alphas = np.arange(1, opts.sines + 1)
    betas = np.arange(opts.sines) ** 2
    tables, tasks = {}, []
    for k in range(opts.tasks):
        if p >= 0:
            anchor = basis[:, opts.tasks + group_of[k]]  # task k's group shares this direction
            w = opts.scale * (math.sqrt(p) * anchor + math.sqrt(1 - p) * basis[:, k])
        else:
            mates = [j for j in range(opts.tasks) if group_of[j] == group_of[k]]
            a = math.sqrt(1 - p)
            b = (-a + math.sqrt(max(a * a + len(mates) * p, 0.0))) / len(mates)
            w = opts.scale * (a * basis[:, k] + b * basis[:, mates].sum(axis=1))
        x = rng.normal(size=(rows, opts.features))
        dot = x @ w
        y = dot + np.sin(np.outer(dot, alphas) + betas).sum(axis=1) + opts.noise * rng.normal(size=rows)
        name = f"task{k}"
        tables[name] = _table(x, y.astype(np.float32), _split_column(opts, rng, rows))
        tasks.append(TaskSpec(name=name, type="regression", path=f"{name}.parquet", target="y"))
    return SuiteSpec(name="mmoe", description=f"MMoE synthetic, pairwise correlation {p}", tasks=tasks), tables


def sinusoid(opts: SinusoidOptions, rng: np.random.Generator, rows: int, state: dict) -> Drawn:
    """The MAML sinusoid family: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]."""
    tables, tasks = {}, []
    for k in range(opts.tasks):
        if k not in state:  # drawn between the first chunk's tasks, as the suite always was
            state[k] = rng.uniform(0.1, 5.0), rng.uniform(0.0, math.pi)
        amp, phase = state[k]
        x = rng.uniform(-5.0, 5.0, size=(rows, 1))
        y = (amp * np.sin(x[:, 0] - phase)).astype(np.float32)
        name = f"sine{k:03d}"
        tables[name] = _table(x, y, _split_column(opts, rng, rows))
        tasks.append(TaskSpec(name=name, type="regression", path=f"{name}.parquet", target="y"))
    return SuiteSpec(name="sinusoid", description="MAML sinusoid regression tasks", tasks=tasks), tables


def multilevel(opts: MultilevelOptions, rng: np.random.Generator, rows: int, state: dict) -> Drawn:
    """G groups of the two-level model a statistician fits with a mixed model (one task a group):

        y_ij = b0 + x_ij . beta + z_j . gamma + u0_j + u1_j x1_ij + e_ij,   e_ij ~ N(0, sigma^2)

    with random intercepts u0_j and slopes u1_j on x1, each of variance tau^2 / 2, where
    tau^2 = between / (1 - between) sigma^2 (`between`: the groups' share of the variance around
    the fixed part). x_ij ~ N(m_j, 1) with a group mean m_j ~ N(0, 0.5^2) (groups differ in their
    rows, as schools do); z_j ~ N(0, 1) is the same on every row of group j. Units are an exam
    score's: b0 = 50 and every effect times 5. The fixed effects, group effects and covariates are
    drawn on the first chunk, so more chunks are more rows of the same groups."""
    p, q = opts.features, opts.group_features
    if not state:
        tau = math.sqrt(opts.between / (1 - opts.between) / 2) * opts.noise
        state.update(beta=rng.normal(size=p), gamma=rng.normal(size=q), u=rng.normal(size=(opts.groups, 2)) * tau,
                     z=rng.normal(size=(opts.groups, q)), m=0.5 * rng.normal(size=(opts.groups, p)))
    tables, tasks = {}, []
    for j in range(opts.groups):
        x = state["m"][j] + rng.normal(size=(rows, p))
        z = np.repeat(state["z"][j][None, :], rows, axis=0)
        u0, u1 = state["u"][j]
        y = x @ state["beta"] + z @ state["gamma"] + u0 + u1 * x[:, 0] + opts.noise * rng.normal(size=rows)
        name = f"g{j:04d}"
        columns = {**{f"x{i + 1}": x[:, i] for i in range(p)}, **{f"z{i + 1}": z[:, i] for i in range(q)}}
        table = pa.table({k: pa.array(v.astype(np.float32)) for k, v in columns.items()})
        table = table.append_column("y", pa.array((50 + 5 * y).astype(np.float32)))
        tables[name] = table.append_column("split", _split_column(opts, rng, rows))
        tasks.append(TaskSpec(name=name, type="regression", path=f"{name}.parquet", target="y"))
    if opts.one_table:  # the same rows, as a user with one table has them: a group column
        named = [t.append_column("school", pa.array([n] * t.num_rows)) for n, t in tables.items()]
        tables = {"schools": pa.concat_tables(named)}
        tasks = [TaskSpec(name="schools", type="regression", path="schools.parquet", target="y", group_column="school")]
    spec = SuiteSpec(name="multilevel", description=f"{opts.groups} groups x {opts.rows} rows, random intercepts and "
                     f"slopes, between-group share {opts.between}", tasks=tasks)
    return spec, tables


@dataclass(frozen=True)
class Generator:
    """A suite family. `draw(options, rng, rows, state)` draws `rows` rows of every task;
    `state` keeps what the first call drew of the suite's structure (latent maps, task weights),
    so that later chunks are more rows of the same tasks."""

    draw: Callable[[BaseModel, np.random.Generator, int, dict], Drawn]
    options: type[BaseModel]
    summary: str

    def make(self, opts: BaseModel) -> Drawn:
        """The whole suite in memory: one chunk of all its rows."""
        return self.draw(opts, np.random.default_rng(opts.seed), opts.rows, {})

    def chunks(self, opts: BaseModel, chunk_rows: int) -> Iterator[Drawn]:
        """The suite `chunk_rows` rows per task at a time: the first chunk from the suite's seed
        (so a suite that fits one chunk is exactly `make`'s), chunk c > 0 from (seed, c)."""
        state: dict = {}
        for c, start in enumerate(range(0, opts.rows, chunk_rows)):
            rng = np.random.default_rng(opts.seed if c == 0 else [opts.seed, c])
            yield self.draw(opts, rng, min(chunk_rows, opts.rows - start), state)


GENERATORS: dict[str, Generator] = {
    "seed-example": Generator(seed_example, SeedExampleOptions, "the article's classification + regression pair"),
    "mmoe": Generator(mmoe, MMoEOptions, "K correlated regression tasks (MMoE synthetic)"),
    "sinusoid": Generator(sinusoid, SinusoidOptions, "MAML sinusoid regression tasks"),
    "multilevel": Generator(multilevel, MultilevelOptions, "G groups of a mixed model: one small regression task a group"),
}


def make_suite(name: str, out_dir: str, options: dict | None = None) -> SuiteSpec:
    """Generates suite `name` into `out_dir`; unknown names and bad options are InputErrors."""
    if name not in GENERATORS:
        raise InputError(f"unknown generator '{name}' (choose from: {', '.join(GENERATORS)})")
    gen = GENERATORS[name]
    try:
        opts = gen.options.model_validate(options or {})
    except ValidationError as e:
        raise InputError(validation_lines(f"generator '{name}'", e)) from e
    return write_suite(out_dir, gen.chunks(opts, GENERATE_CHUNK_ROWS))
