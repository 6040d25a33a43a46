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
    beside = epochs([TaskBatches(x, y, 4, 5, 3), TaskBatches(x[:4], y[:4], 4, 5, 7)], 2, 3)[0]
    assert [b[1].tolist() for b in beside] == alone


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
    assert all(torch.isfinite(v) for v in losses.values()) and model.trunk[0].weight.dtype == torch.float32
