import torch

from distributed_mtml.config import ModelConfig
from distributed_mtml.models import MultiTaskModel, TaskShape
from distributed_mtml.runtime.worker import make_optimizer
from distributed_mtml.train.step import TaskBatches, multitask_step


def test_task_batches_fill_a_fixed_number_of_steps_whatever_the_task_size():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10.0)
    batches = list(TaskBatches(x, y, batch_size=4, seed=0, task_index=0).epoch(0, steps=7))
    assert len(batches) == 7 and all(len(b[1]) == 4 for b in batches)
    seen = torch.cat([b[1] for b in batches])
    assert set(seen[:8].tolist()) <= set(range(10)) and len(set(seen[:10].tolist())) >= 8  # a permutation first


def test_task_batches_are_reproducible_per_epoch_and_differ_between_epochs():
    x, y = torch.randn(50, 3), torch.arange(50.0)
    make = lambda: TaskBatches(x, y, 8, seed=5, task_index=2)  # noqa: E731
    first = [b[1].tolist() for b in make().epoch(3, 4)]
    assert first == [b[1].tolist() for b in make().epoch(3, 4)]
    assert first != [b[1].tolist() for b in make().epoch(4, 4)]


def test_many_tasks_rows_are_drawn_together_as_each_alone_would_be_and_in_whole_passes():
    """`shuffled_rows` of several tasks at once: each task's rows are what it draws alone (its
    batches do not depend on the tasks beside it), pass after pass a permutation of its rows."""
    from distributed_mtml.train.step import epochs, shuffled_rows

    together = shuffled_rows(5, [3, 7, 9], [10, 4, 6], epoch=2, needed=[25, 4, 6])
    for rows, (task, size, needed) in zip(together, [(3, 10, 25), (7, 4, 4), (9, 6, 6)]):
        assert (rows == shuffled_rows(5, [task], [size], 2, [needed])[0]).all()
    first = together[0]
    assert len(first) == 25 and sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert list(first[:10]) != list(first[10:20])  # each pass its own permutation
    assert (shuffled_rows(5, [3], [10], 3, [10])[0] != first[:10]).any()  # and each epoch
    x, y = torch.randn(10, 2), torch.arange(10.0)
    alone = [b[1].tolist() for b in TaskBatches(x, y, 4, seed=5, task_index=3).epoch(2, 3)]
    beside = [group[0] for group in epochs([TaskBatches(x, y, 4, 5, 3), TaskBatches(x[:4], y[:4], 4, 5, 7)], 2, 3)]
    assert [b[1].tolist() for b in beside] == alone


def test_tasks_held_joined_give_each_step_the_batches_each_task_draws_alone():
    """`join_rows` holds small tasks' rows in one tensor (a task's own rows a view of it) and
    `epochs` gathers a step's batches of all of them at once: the same rows as each task's own
    draw, in the sources' order, with a task too large to join, one of another width and a
    streamed source beside."""
    from distributed_mtml.train import step
    from distributed_mtml.train.step import epochs, join_rows

    g = torch.Generator().manual_seed(0)
    sizes = [5, 9, 3, 12]
    data = [(torch.randn(n, 3, generator=g), torch.randn(n, generator=g)) for n in sizes]
    odd = (torch.randn(6, 2, generator=g), torch.randn(6, generator=g))

    class Streamed:  # a streamed task's source (`data.stream.StreamedBatches`): it draws its own rows
        def epoch(self, epoch: int, steps: int):
            return iter([(torch.full((2, 3), float(epoch * 10 + s)), torch.zeros(2)) for s in range(steps)])

    def sources(joined: bool):
        out = [TaskBatches(x, y, 4, 1, i) for i, (x, y) in enumerate(data)] + [TaskBatches(*odd, 4, 1, 9), Streamed()]
        if joined:
            original, step.JOIN_ROWS = step.JOIN_ROWS, 10  # the 12-row task stays apart
            try:
                join_rows(out[:4])
            finally:
                step.JOIN_ROWS = original
        return out

    joined = sources(True)
    assert joined[0].joined is not None and joined[0].joined[0] is joined[2].joined[0] and joined[3].joined is None
    assert all(torch.equal(b.x, x) for b, (x, _) in zip(joined, data))  # a task's rows, now a view
    for epoch in (0, 3):
        alone = list(epochs(sources(False), epoch, 4))
        together = list(epochs(joined, epoch, 4))
        assert len(together) == len(alone) == 4
        for a, b in zip(alone, together):
            assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_multitask_step_gradient_is_the_mean_task_gradient():
    """One trunk forward for all tasks, loss scale 1/T: the trunk gradient equals the mean
    of the per-task gradients, which is what DDP's mean across one-task workers gives."""
    tasks = [TaskShape("a", "regression", 4), TaskShape("b", "classification", 4, 2)]
    shapes = {t.name: t for t in tasks}
    batches = {"a": (torch.randn(6, 4), torch.randn(6)), "b": (torch.randn(6, 4), torch.randint(0, 2, (6,)))}

    def trunk_grad(names, scale):
        model = MultiTaskModel(ModelConfig(), tasks, seed=1)
        opt = make_optimizer("sgd", list(model.parameters()), lr=0.0, weight_decay=0.0)
        multitask_step(model.trunk, model.task_modules, shapes, {n: batches[n] for n in names}, opt, scale)
        return model.trunk[0].weight.grad.clone()

    together = trunk_grad(["a", "b"], 0.5)
    separate = (trunk_grad(["a"], 1.0) + trunk_grad(["b"], 1.0)) / 2
    assert torch.allclose(together, separate, atol=1e-6)


def test_bf16_autocast_covers_the_forward_and_losses_but_not_the_backward_or_step():
    tasks = [TaskShape("a", "regression", 4), TaskShape("b", "classification", 4, 2)]
    shapes = {t.name: t for t in tasks}
    batches = {"a": (torch.randn(6, 4), torch.randn(6)), "b": (torch.randn(6, 4), torch.randint(0, 2, (6,)))}
    model = MultiTaskModel(ModelConfig(), tasks, seed=1)
    forward, backward = [], []
    model.trunk.register_forward_hook(lambda m, i, out: forward.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    model.trunk[0].weight.register_hook(lambda g: backward.append((torch.is_autocast_enabled("cpu"), g.dtype)))
    opt = make_optimizer("adam", list(model.parameters()), lr=1e-3, weight_decay=0.0)
    losses = multitask_step(model.trunk, model.task_modules, shapes, batches, opt, 0.5, autocast=torch.bfloat16)
    assert forward == [(True, torch.bfloat16)]  # the trunk ran in bf16 under autocast
    assert backward == [(False, torch.float32)]  # fp32 gradients, computed outside autocast
    assert losses.shape == (2,) and torch.isfinite(losses).all() and model.trunk[0].weight.dtype == torch.float32
