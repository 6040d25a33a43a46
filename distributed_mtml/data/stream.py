"""Tasks larger than memory: read a split batch by batch instead of whole.

A task whose train split, as float32, is above `data.max_in_memory_mb` is *streamed*:
- training reads its train split with Ray Data (`split_dataset`), handed to the TorchTrainer
  unsplit so that only the worker that owns the task consumes it, and iterated in seeded,
  permuted windows of `data.shuffle_buffer_rows` rows with prefetching (`StreamedBatches`); the worker's validation reads the val split
  the same way, in order (`dataset_batches`);
- the driver's test metrics, the trivial baseline and `mtml evaluate` read a split with pyarrow in
  batches (`split_batches`). Metrics are summed over batches (`metrics.StreamedMetrics`).
Small tasks stay in memory: for them, a whole-table read is faster and exact in everything.
"""

from __future__ import annotations

import zlib
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from distributed_mtml.data.prepare import TaskPrep
from distributed_mtml.data.scan import open_task, read_batches
from distributed_mtml.data.suite import (
    Partition,
    TaskSpec,
    by_table,
    encode_target,
    feature_columns,
    filesystem,
    group_mask,
    join_path,
    labelled,
    seeded_split,
)

EVAL_BATCH_ROWS = 1 << 14  # rows per evaluation batch: on a 2M-row task, 262,144 grew a worker by 100 MB more


def train_megabytes(rows: int, features: int) -> float:
    """The train split's size in a worker's memory: features and target as float32."""
    return rows * (features + 1) * 4 / 2**20


def split_batches(suite_dir: str, task: TaskSpec, split: str, prep: TaskPrep, batch_rows: int = EVAL_BATCH_ROWS,
                  features: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One split of a task's labelled rows as the model sees it (`prep` applied), `batch_rows`
    rows at a time; `features=False` reads the target column alone (x then has no columns)."""
    data = open_task(suite_dir, task)
    columns = [*(feature_columns(task, data.schema) if features else []), task.target]
    rows = task._rows if task.grouped else data.count_rows()
    seeded = seeded_split(task, rows) == split if task.split_column not in data.schema.names else None
    only = None if seeded is not None else (task.split_column, split)
    pending, offset = pa.Table.from_batches([], schema=pa.schema([data.schema.field(c) for c in columns])), 0
    for batch in read_batches(data, [*columns, *([task.group_column] if task.grouped else [])], batch_rows, only):
        if task.grouped:  # a group task's rows of its entry's table
            batch = batch.filter(group_mask(task, batch.column(task.group_column))).select(columns)
        if seeded is not None:
            batch, offset = batch.filter(pa.array(seeded[offset : offset + batch.num_rows])), offset + batch.num_rows
        batch = batch.filter(pa.array(labelled(batch.column(task.target))))
        pending = pa.concat_tables([pending, pa.Table.from_batches([batch])])
        while pending.num_rows >= batch_rows:  # the filter leaves batches of any size: re-cut them
            yield _prepared(task, pending.slice(0, batch_rows), prep, features)
            pending = pending.slice(batch_rows)
    if pending.num_rows:
        yield _prepared(task, pending, prep, features)


def tasks_split_batches(suite_dir: str, tasks: list[TaskSpec], split: str, preps: dict[str, TaskPrep],
                        batch_rows: int = EVAL_BATCH_ROWS, features: bool = True
                        ) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(task, batch) of every task's `split`, as `split_batches` gives them: a task's own file
    alone, and the groups of one entry from one pass over their table (cut by group batch by
    batch), so that a thousand groups cost one read, not a thousand."""
    for same in by_table(tasks):
        if same[0].grouped:
            yield from _entry_batches(suite_dir, same, split, preps, batch_rows, features)
        else:
            yield from ((same[0].name, b) for b in split_batches(suite_dir, same[0], split, preps[same[0].name],
                                                                 batch_rows, features))


LABELLED = "__mtml_labelled"  # a batch's rows with a target, as a column that travels through `Partition`


def _entry_batches(suite_dir: str, tasks: list[TaskSpec], split: str, preps: dict[str, TaskPrep], batch_rows: int,
                   features: bool) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The groups of one entry (one table, features and target): each read batch cut by group,
    each group's rows of `split` (its seeded split follows its own rows, in the table's order)."""
    first = tasks[0]
    data = open_task(suite_dir, first)
    columns = [*(feature_columns(first, data.schema) if features else []), first.target]
    has_split = first.split_column in data.schema.names
    seeded = {t.name: seeded_split(t, t._rows) == split for t in tasks} if not has_split else {}
    offsets = dict.fromkeys(seeded, 0)
    only = (first.split_column, split) if has_split else None
    cut = Partition(tasks)
    for batch in read_batches(data, [*columns, first.group_column], batch_rows, only):
        batch = batch.append_column(LABELLED, pa.array(labelled(batch.column(first.target))))  # once a batch
        for task, rows in cut(batch):
            if task.name in seeded:
                start, offsets[task.name] = offsets[task.name], offsets[task.name] + rows.num_rows
                rows = rows.filter(pa.array(seeded[task.name][start : offsets[task.name]]))
            rows = rows.filter(rows.column(LABELLED)).select(columns)
            if rows.num_rows:
                yield task.name, _prepared(task, pa.Table.from_batches([rows]), preps[task.name], features)


def _prepared(task: TaskSpec, table: pa.Table, prep: TaskPrep, features: bool) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.from_numpy(np.asarray(prep.scaled_target(encode_target(task, table.column(task.target), prep.classes))))
    if not features:
        return torch.empty(len(y), 0), y
    names = [c for c in table.column_names if c != task.target]
    return torch.from_numpy(_inputs([table.column(c).to_numpy(zero_copy_only=False) for c in names], prep)), y


def _inputs(columns: list[np.ndarray], prep: TaskPrep) -> np.ndarray:
    """Raw feature columns -> the [rows, features] float32 array the model takes, a column at a
    time (`TaskPrep.input_column`): no float64 copy of the whole batch."""
    x = np.empty((len(columns[0]), len(columns)), dtype=np.float32)
    for i, values in enumerate(columns):
        x[:, i] = prep.input_column(i, values.astype(np.float32))
    return x


def task_features(suite_dir: str, task: TaskSpec) -> list[str]:
    """The task's feature columns, from its schema alone (the footers, no rows)."""
    return feature_columns(task, open_task(suite_dir, task).schema)


def dataset_name(task: str, split: str = "train") -> str:
    """The name the trainer knows a streamed task's dataset of `split` by (Ray Data names its log
    files after it, so a group task's '/' becomes '~')."""
    return f"{split}-{task.replace('/', '~')}"


def split_dataset(suite_dir: str, task: TaskSpec, features: list[str], split: str = "train"):
    """The task's rows of `split` as a Ray Data dataset: only the needed columns, filtered to the
    split at the scan (any pyarrow filesystem URI). The reading happens in Ray Data's read tasks;
    only blocks reach the worker (a Parquet row group decoded in the worker cost it ~170 MB)."""
    import ray.data
    from ray.data.expressions import col, lit

    fs, inner = filesystem(join_path(suite_dir, task.path))
    ds = ray.data.read_parquet(inner, filesystem=fs)
    ds = ds.filter(expr=col(task.split_column) == lit(split))
    if task.grouped:  # a group task: its entry's rows that hold its group value(s)
        ds = ds.filter(expr=col(task.group_column).is_in(list(task._groups)))
    ds = ds.select_columns([*features, task.target])
    ds = ds.map_batches(_labelled_chunk, fn_kwargs={"target": task.target}, batch_format="pyarrow", batch_size=None,
                        zero_copy_batch=True)
    ds.context.execution_options.preserve_order = True  # the file's order: a seeded shuffle then repeats
    ds.context.enable_progress_bars = False
    return ds


def _labelled_chunk(block: pa.Table, target: str) -> pa.Table:
    """A block's labelled rows (a null target: not a row of this task) as one contiguous chunk
    per column, made in the read task. A block read from
    Parquet has a chunk per row group, and the worker's iterator joins a block's chunks in its
    own private memory before cutting batches from it: a whole block (28 and 59 MB on a 2M-row
    task) held per streamed task. A one-chunk block is read in place from the object store (a
    Ray actor's Arrow allocations while iterating a split: 92 MB at most before, 4 MB after)."""
    return block.filter(pa.array(labelled(block.column(target)))).combine_chunks()


class _Collate:
    """Ray Data's numpy batch -> (x, y) tensors as the model takes them."""

    def __init__(self, task: TaskSpec, features: list[str], prep: TaskPrep):
        self.task, self.features, self.prep = task, features, prep

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        x = _inputs([batch[c] for c in self.features], self.prep)
        y = encode_target(self.task, pa.array(batch[self.task.target]), self.prep.classes)
        return torch.from_numpy(x), torch.from_numpy(np.asarray(self.prep.scaled_target(y)))


def dataset_batches(shard, task: TaskSpec, features: list[str], prep: TaskPrep,
                    batch_rows: int = EVAL_BATCH_ROWS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A streamed task's dataset read once in order, prepared as the model sees it (evaluation)."""
    return iter(shard.iter_torch_batches(batch_size=batch_rows, collate_fn=_Collate(task, features, prep),
                                         prefetch_batches=1))


class StreamedBatches:
    """Endless mini-batches of a streamed task's train split, the in-memory `TaskBatches`'s twin.

    The split is read in windows of `shuffle_rows` rows (rounded up to whole batches) in the
    file's order; each window is permuted and cut into batches. Ray Data's own local shuffle
    buffer was not used: it holds and concatenates whole blocks (a Parquet row group: 524,288
    rows in a generated suite when this was measured, 65,536 now) in the worker's private
    memory, and pays its iterator per batch;
    a window is one zero-copy slice of a block, one collate and one permutation.

    The batches are one endless sequence of passes over the dataset; pass p's permutations are
    seeded by (seed, task, p) and Ray Data keeps the file's order, so the sequence is the same
    every time. Epoch e takes its `steps` batches from position e x steps on: epochs continue a
    pass where the last one stopped (with `steps_per_epoch` below a pass, every row is still
    seen in turn), and a worker restarted from a checkpoint opens the pass it was in and skips
    to its place, seeing exactly what it would have seen.
    """

    def __init__(self, shard, task: TaskSpec, features: list[str], prep: TaskPrep, batch_size: int, seed: int,
                 task_index: int, rows: int, shuffle_rows: int, device: torch.device):
        self.shard, self.collate = shard, _Collate(task, features, prep)
        self.batch_size, self.seed, self.task_index = batch_size, seed, task_index
        self.per_pass = max(1, rows // batch_size)  # full batches in a pass (the rest is dropped)
        self.window = -(-max(shuffle_rows, batch_size) // batch_size) * batch_size
        self.device = device
        self.position, self.number, self.batches = -1, 0, iter(())

    def _open(self, number: int) -> None:
        seed = zlib.crc32(np.array([self.seed, self.task_index, number], dtype=np.int64).tobytes())
        self.number = number
        self.batches = self._pass(torch.Generator().manual_seed(seed))

    def _pass(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass: each window permuted, then cut into full batches (a window's rest dropped:
        `rows // batch_size` batches in all, as `per_pass` counts)."""
        for x, y in self.shard.iter_torch_batches(batch_size=self.window, collate_fn=self.collate, prefetch_batches=1):
            order = torch.randperm(len(y), generator=generator)
            x, y = x[order].to(self.device), y[order].to(self.device)
            for start in range(0, len(y) - self.batch_size + 1, self.batch_size):
                yield x[start : start + self.batch_size], y[start : start + self.batch_size]

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.batches, None)
        if batch is None:  # the pass is over: the next one
            self._open(self.number + 1)
            batch = next(self.batches, None)
            if batch is None:
                raise RuntimeError(f"task '{self.collate.task.name}': its streamed train split has fewer rows than a batch")
        self.position += 1
        return batch

    def epoch(self, epoch: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = epoch * steps
        if self.position != start:  # this process's first epoch, e.g. after a restart: seek
            number, skip = divmod(start, self.per_pass)
            self._open(number)
            for _ in range(skip):
                next(self.batches)
            self.position = start
        for _ in range(steps):
            yield self._next()
