"""`model.architecture`: the shared part and each task's part, their forward and what they share."""

from __future__ import annotations

import tempfile

import pandas as pd
import pytest
import torch

from distributed_mtml.config import ModelConfig
from distributed_mtml.models import MultiTaskModel, TaskShape, new_task, task_losses

SHAPES = [TaskShape("a", "regression", 4), TaskShape("b", "classification", 4, 3), TaskShape("c", "regression", 2)]


def _model(architecture: str, passthrough: bool = True, seed: int = 0, **options) -> MultiTaskModel:
    cfg = ModelConfig(architecture=architecture, trunk={"widths": [8, 6], "passthrough": passthrough}, **options)
    return MultiTaskModel(cfg, SHAPES, seed)


def _batches(seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {"a": (torch.randn(5, 4, generator=g), torch.randn(5, generator=g)),
            "b": (torch.randn(7, 4, generator=g), torch.randint(0, 3, (7,), generator=g)),
            "c": (torch.randn(3, 2, generator=g), torch.randn(3, generator=g))}


def _gates_of(module) -> list:
    """A task's gates: ple's one a level, cgc's one, mmoe's (the part itself); cross_stitch's
    column has none."""
    mix = module.mix
    if hasattr(mix, "gates"):
        return list(mix.gates)
    if hasattr(mix, "own"):
        return [mix.gate]
    return [mix] if hasattr(mix, "weights") else []


def _scramble_gates(model: MultiTaskModel) -> None:
    """Gates away from their zero start, so that each task weighs the experts its own way."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.task_modules.values():
            for gate in _gates_of(module):
                gate.gate.weight.copy_(torch.randn(gate.gate.weight.shape, generator=g))


@pytest.mark.parametrize("architecture", ["hard", "mmoe", "cgc", "ple", "cross_stitch"])
@pytest.mark.parametrize("passthrough", [True, False])
def test_each_architecture_gives_every_task_its_outputs_and_trains_its_shared_and_own_parts(architecture, passthrough):
    model = _model(architecture, passthrough)
    batches = _batches()
    for name, (x, _) in batches.items():
        assert model(name, x).shape == (len(x), model.tasks[name].out_width)
    losses = task_losses(model.trunk, model.task_modules, model.tasks, batches)
    assert len(losses) == 3 and all(torch.isfinite(loss) for loss in losses)
    losses.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trunk.parameters() if p.dim() == 2)
    for module in model.task_modules.values():
        assert (module.mix is None) == (architecture == "hard")
        if module.mix is not None:
            assert all(p.grad is not None for p in module.mix.parameters())


def test_mmoe_with_one_expert_is_hard_sharing():
    hard, mmoe = _model("hard"), _model("mmoe", experts=1)
    mmoe.trunk.experts[0].load_state_dict(hard.trunk.state_dict())  # the trunk's layers, without the passthrough
    mmoe.shared_heads.load_state_dict(hard.shared_heads.state_dict())
    for name in hard.task_modules:
        mmoe.task_modules[name].head.load_state_dict(hard.task_modules[name].head.state_dict())
        mmoe.task_modules[name].adapter.load_state_dict(hard.task_modules[name].adapter.state_dict())
    _scramble_gates(mmoe)  # one expert: any gate gives it weight 1
    with torch.no_grad():
        for name, (x, _) in _batches().items():
            torch.testing.assert_close(mmoe(name, x), hard(name, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("architecture", ["mmoe", "cgc"])
def test_gates_sum_to_one_start_as_the_experts_mean_and_mix_what_they_weigh(architecture):
    model = _model(architecture, passthrough=False, experts=3)
    gate = model.task_modules["a"].mix
    gate = gate.gate if architecture == "cgc" else gate
    x = torch.randn(6, 4)
    count = 3 + (1 if architecture == "cgc" else 0)
    torch.testing.assert_close(gate.weights(x), torch.full((6, count), 1 / count))
    _scramble_gates(model)
    w = gate.weights(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(6))
    outputs = torch.randn(6, count * 6)
    by_hand = sum(w[:, [e]] * outputs[:, e * 6:(e + 1) * 6] for e in range(count))
    torch.testing.assert_close(gate.mixed(x, outputs), by_hand)


@pytest.mark.parametrize("architecture", ["hard", "mmoe", "cgc", "ple"])
def test_a_new_task_reads_what_the_known_tasks_gates_share(architecture):
    """A group the model was not trained on: under mmoe the known gates averaged; under cgc and
    ple (at every level) the same over the shared experts only (it has no experts of its own)."""
    options = {"experts": 3} if architecture != "hard" else {}
    model = _model(architecture, **options)
    if architecture != "hard":
        _scramble_gates(model)
    known = [model.task_modules[n] for n in ("a", "b")]
    cfg = ModelConfig(architecture=architecture, **options)
    module = new_task(cfg, known, torch.nn.Identity(), torch.nn.Linear(6 + 4, 1))
    if architecture == "hard":
        assert module.mix is None
        return
    made = list(module.mix.gates) if architecture == "ple" else [module.mix]
    for level, gate in enumerate(made):
        theirs = [_gates_of(k)[level] for k in known]
        torch.testing.assert_close(gate.gate.weight, torch.stack([g.gate.weight[:3] for g in theirs]).mean(0))
        torch.testing.assert_close(gate.gate.bias, torch.stack([g.gate.bias[:3] for g in theirs]).mean(0))
    x = torch.randn(4, 4)
    assert module(model.trunk, x).shape == (4, 1)


@pytest.mark.parametrize("architecture", ["hard", "mmoe", "ple"])
def test_head_inputs_of_many_tasks_in_one_pass_equal_each_tasks_own(architecture):
    from distributed_mtml.evaluate import head_inputs

    model = _model(architecture)
    if architecture != "hard":
        _scramble_gates(model)
    inputs = {n: x for n, (x, _) in _batches().items()}  # c's adapter is a Linear: through the trunk alone
    got = head_inputs(model.trunk, model.task_modules, inputs)
    with torch.no_grad():
        for name, x in inputs.items():
            module = model.task_modules[name]
            z = module.adapter(x)
            torch.testing.assert_close(got[name], module.features(z, model.trunk(z)))


def test_a_gated_run_keeps_a_model_that_scores_as_it_did_in_training_and_logs_its_gates(ray_session, tmp_path, capsys):
    """Local mode, 8 groups of one table, cgc (mmoe's shared experts and gates, and each task's
    own experts), TAG relations on: the kept checkpoint, loaded again, scores the val
    split as the worker scored it at that epoch (heads through the gates in one pass there, one
    task at a time here); the gates' mean weights and similarity are logged, and `mtml affinity`
    sets them beside TAG's affinity."""
    from distributed_mtml.artifacts import load_model
    from distributed_mtml.cli import main
    from distributed_mtml.config import validate_config
    from distributed_mtml.data.generators import make_suite
    from distributed_mtml.evaluate import evaluate
    from distributed_mtml.tracking import Tracker
    from distributed_mtml.train.launch import run_training

    suite = str(tmp_path / "suite")
    make_suite("multilevel", suite, {"groups": 8, "rows": 30, "features": 4, "seed": 0, "one_table": True})
    cfg = validate_config({"suite": {"path": suite}, "model": {"architecture": "cgc", "experts": 2},
                           "training": {"epochs": 4}, "scaling": {"num_workers": 0}, "relations": {"enabled": True},
                           "checkpoint": {"dir": str(tmp_path / "runs")}})
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    outcome = run_training(cfg, "cgc", tracker)
    model, _ = load_model(outcome.checkpoint_path)
    assert all(m.mix is not None for m in model.task_modules.values())
    again = evaluate(model, suite, "val")
    for key, value in again.items():
        assert outcome.kept[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    logged = {a.path for a in tracker.client().list_artifacts(outcome.run_id, "relations")}
    assert {"relations/gates.csv", "relations/gate_similarity.csv", "relations/gates.png"} <= logged
    with tempfile.TemporaryDirectory() as d:
        weights = pd.read_csv(tracker.client().download_artifacts(outcome.run_id, "relations/gates.csv", d))
    assert len(weights) == 8 and list(weights.columns)[-1] == "own experts"
    assert weights.drop(columns="task").sum(axis=1).to_numpy() == pytest.approx(1.0, abs=1e-5)
    for _, row in weights.iterrows():  # each epoch's weights are logged; the kept epoch's are the model's
        for column in ("expert 1", "expert 2", "own experts"):
            key = f"gates/{row['task']}/{column.replace(' ', '_')}"
            assert outcome.kept[key] == pytest.approx(row[column], abs=1e-5), key
    capsys.readouterr()
    assert main(["affinity", "--run", outcome.run_id, "--tracking-uri", tracker.uri]) == 0
    assert "rank correlation with TAG affinity (both directions averaged), over 28 pairs" in capsys.readouterr().out


def test_ple_levels_follow_the_trunk_widths_and_a_task_path_reads_the_shared_path():
    """Two levels (widths 8, 6), 3 shared experts and 1 own a level: the shared output is each
    level's shared experts side by side; changing a shared gate (the shared path into level 2)
    changes every task's output, changing one task's gate changes that task's alone."""
    model = _model("ple", passthrough=False, experts=3)
    x = torch.randn(5, 4)
    assert model.trunk(x).shape == (5, 3 * 8 + 3 * 6)
    before = {n: model(n, torch.randn(5, 4, generator=torch.Generator().manual_seed(2))) for n in ("a", "b")}
    with torch.no_grad():
        model.trunk.gates[0].gate.weight.normal_()
    after = {n: model(n, torch.randn(5, 4, generator=torch.Generator().manual_seed(2))) for n in ("a", "b")}
    assert all(not torch.allclose(before[n], after[n]) for n in before)
    with torch.no_grad():
        model.task_modules["a"].mix.gates[1].gate.weight.normal_()
    last = {n: model(n, torch.randn(5, 4, generator=torch.Generator().manual_seed(2))) for n in ("a", "b")}
    assert not torch.allclose(last["a"], after["a"]) and torch.equal(last["b"], after["b"])


def test_cross_stitch_with_identity_mixing_is_independent_columns_and_its_size_is_checked():
    from distributed_mtml.config import validate_config
    from distributed_mtml.errors import InputError
    from distributed_mtml.train.plan import _check_architecture_fits

    model = _model("cross_stitch", passthrough=False)
    columns = model.trunk
    with torch.no_grad():
        for stitch in columns.stitches:
            stitch.copy_(torch.eye(3))
    x = torch.randn(5, 4)
    for index, name in enumerate(["a", "b"]):  # a and b read 4 features: no adapter
        alone = x
        for layers in columns.layers:
            alone = layers[index](alone)
        torch.testing.assert_close(model.task_modules[name].features(x, columns(x)), alone)
    before = model("a", x)
    with torch.no_grad():
        columns.layers[0][1][0].weight.normal_()  # b's column: a's output stays
    torch.testing.assert_close(model("a", x), before)
    config = validate_config({"model": {"architecture": "cross_stitch"}})
    _check_architecture_fits(config, 16)
    with pytest.raises(InputError, match="cross_stitch takes at most 16 tasks .* the suite has 17"):
        _check_architecture_fits(config, 17)


def test_gate_similarity_is_one_for_the_same_weights_and_its_tables_and_figure_are_written(tmp_path):
    import numpy as np

    from distributed_mtml import gates
    from distributed_mtml.relations import from_csv

    weights = np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    alike = gates.similarity(weights)
    np.testing.assert_allclose(alike, [[1, 1, 0.5 ** 0.5], [1, 1, 0.5 ** 0.5], [0.5 ** 0.5, 0.5 ** 0.5, 1]])
    paths = gates.write(weights, ["a", "b", "c"], ["expert 1", "expert 2"], str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["gates.csv", "gate_similarity.csv", "gates.png"]
    back, names = from_csv(open(paths[1]).read())
    np.testing.assert_allclose(back, alike, rtol=1e-5)
    assert names == ["a", "b", "c"]
    same = np.array([[0, 1, 2, 3], [1, 0, 4, 5], [2, 4, 0, 6], [3, 5, 6, 0]], dtype=float)  # TAG affinity, symmetric
    assert gates.agreement(same, list("abcd"), same / 10, list("abcd")) == (1.0, 6)
    assert gates.agreement(same, list("abcd"), -same, list("dcba")[::-1]) == (-1.0, 6)


@pytest.mark.parametrize("architecture", ["mmoe", "cgc", "ple", "cross_stitch", "hard"])
def test_each_epoch_logs_what_a_task_draws_on_as_its_own_keys(architecture):
    """Gated kinds: a task's mean gate weights over its rows, summing to 1, as `mean_weights`
    gives them; cross-stitch: the task's row of the last mixing matrix; hard: nothing."""
    from distributed_mtml import gates

    model = _model(architecture, **({"experts": 3} if architecture in ("mmoe", "cgc", "ple") else {}))
    _scramble_gates(model)
    inputs = {n: x for n, (x, _) in _batches().items() if n != "c"}
    got = gates.epoch_metrics(model.trunk, model.task_modules, inputs, ["a", "b", "c"])
    if architecture == "hard":
        assert got == {}
    elif architecture == "cross_stitch":
        with torch.no_grad():
            model.trunk.stitches[-1].copy_(torch.arange(9.0).view(3, 3))
        got = gates.epoch_metrics(model.trunk, model.task_modules, inputs, ["a", "b", "c"])
        assert got == {f"cross_stitch/{t}/from_{s}": float(3 * i + j) for i, t in enumerate("ab")
                       for j, s in enumerate("abc")}
    else:
        columns = ["expert_1", "expert_2", "expert_3"] + ([] if architecture == "mmoe" else ["own_experts"])
        assert sorted(got) == sorted(f"gates/{t}/{c}" for t in "ab" for c in columns)
        for task, (x, _) in _batches().items():
            if task in inputs:
                z = model.task_modules[task].adapter(x)
                by_hand = model.task_modules[task].mix.shared_weights(z, model.trunk(z)).mean(0)
                assert [got[f"gates/{task}/{c}"] for c in columns] == pytest.approx(by_hand.tolist(), abs=1e-6)
                assert sum(got[f"gates/{task}/{c}"] for c in columns) == pytest.approx(1.0, abs=1e-6)


def test_the_similarity_of_every_epoch_comes_from_the_logged_weights():
    from distributed_mtml import gates

    history = {"gates/a/expert_1": {0: 1.0, 1: 0.5, 2: 0.2}, "gates/a/expert_2": {0: 0.0, 1: 0.5, 2: 0.8},
               "gates/b/expert_1": {0: 0.0, 1: 0.5}, "gates/b/expert_2": {0: 1.0, 1: 0.5}}
    lines = gates.similarity_by_epoch(history, ["a", "b"], ["expert 1", "expert 2"])
    assert lines == ["epoch,task,other,similarity\n", "0,a,b,0\n", "1,a,b,1\n"]  # epoch 2: b's weights are missing
