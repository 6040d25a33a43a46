"""Transfer strategies: which parameters each one trains, and the checks on bad configs."""

import pytest
import torch

from distributed_mtml.config import ModelConfig, TrunkConfig, validate_config
from distributed_mtml.data.prepare import TaskPrep
from distributed_mtml.errors import InputError
from distributed_mtml.meta.algorithms import MetaLearner
from distributed_mtml.models import MultiTaskModel, TaskShape
from distributed_mtml.transfer.fit import fit
from distributed_mtml.transfer.source import TransferInputs
from distributed_mtml.transfer.strategies import build, check

SOURCE_TASKS = [TaskShape("classify", "classification", 10, 2), TaskShape("regress", "regression", 10)]


NEW_TARGET = TaskShape("new", "regression", 10)


def _inputs(target=NEW_TARGET, meta=None, tasks=SOURCE_TASKS, architecture="hard"):
    cfg = ModelConfig(trunk=TrunkConfig(widths=[16, 8, 4]), heads="separate" if meta else "shared_plus_offset",
                      architecture=architecture)
    model = MultiTaskModel(cfg, tasks, seed=0)  # a meta-learned model's one head is its own (meta.checkpoint)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, target.num_features, generator=g)
    y = torch.randint(0, 2, (40,), generator=g) if target.type == "classification" else x.sum(1)
    source_config = {"model": cfg.model_dump(mode="json"), "meta": meta}
    learner = MetaLearner(model, meta["algorithm"], meta["inner_lr"]) if meta else None
    return TransferInputs(model, source_config, learner, target, (x, y), 8, (x, y), (x, y), TaskPrep()).draw(0)


def _trained_names(strategy, inputs, **kw):
    built = build(strategy, inputs, kw.get("partial_layers", 1), kw.get("adapter_width", 4), seed=0)
    before = {n: p.detach().clone() for n, p in built.model.named_parameters()}
    fit(built, inputs, steps=3, lr=0.05, eval_every=3)
    changed = {n for n, p in built.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return built, changed


def test_scratch_and_finetune_train_everything_and_scratch_ignores_the_source():
    inputs = _inputs()
    built, changed = _trained_names("scratch", inputs)
    assert changed == {n for n, _ in built.model.named_parameters()}
    assert not torch.equal(built.model.trunk[0].weight, inputs.model.trunk[0].weight)
    built, changed = _trained_names("finetune", inputs)
    assert changed == {n for n, _ in built.model.named_parameters()}


def test_linear_probe_trains_the_head_only_and_leaves_the_source_untouched():
    inputs = _inputs()
    source = inputs.model.trunk[0].weight.detach().clone()
    built, changed = _trained_names("linear_probe", inputs)
    assert changed == {n for n, _ in built.model.named_parameters() if n.startswith("head.")}
    assert all(p.grad is None for n, p in built.model.named_parameters() if n.startswith("trunk."))
    assert torch.equal(inputs.model.trunk[0].weight, source)  # strategies copy the source


def test_partial_trains_the_top_k_trunk_layers_and_the_head():
    built, changed = _trained_names("partial", _inputs(), partial_layers=2)
    linears = [i for i, m in enumerate(built.model.trunk) if isinstance(m, torch.nn.Linear)]
    top = {f"trunk.{i}.{w}" for i in linears[-2:] for w in ("weight", "bias")}
    assert changed == top | {n for n, _ in built.model.named_parameters() if n.startswith("head.")}


def test_adapter_trains_adapters_input_map_and_head_and_starts_as_the_frozen_trunk():
    inputs = _inputs(target=TaskShape("wide", "regression", 7))  # 7 features into a 10-input trunk
    built = build("adapter", inputs, 1, 4, seed=0)
    features = built.model.input_map(inputs.train[0])
    plain = inputs.model.trunk(features)
    assert torch.allclose(built.model.trunk(features), plain)  # adapters begin as the identity
    _, changed = _trained_names("adapter", inputs)
    assert changed and all(n.startswith(("head.", "input_map.")) or ".up." in n or ".down." in n for n in changed)
    assert any(".up." in n for n in changed) and any(n.startswith("input_map.") for n in changed)


def test_nearest_head_starts_from_the_best_fitting_compatible_source_head():
    inputs = _inputs(target=TaskShape("new", "classification", 10, 2))
    built = build("nearest_head", inputs, 1, 4, seed=0)
    features = inputs.model.trunk(inputs.train[0])
    assert torch.equal(built.model.head(features), inputs.model.task_modules["classify"].head(features))
    _, changed = _trained_names("nearest_head", inputs)
    assert changed == {n for n, _ in built.model.named_parameters()}


@pytest.mark.parametrize("heads", ["shared_plus_offset", "task_embedding"])
def test_a_new_head_starts_from_the_shared_head_of_its_type_and_scratch_does_not(heads):
    """Sharing heads: a new task's head is the shared head of its type and width (a task's own
    part at zero); a type the source has no shared head for, and `scratch`, start fresh."""
    cfg = ModelConfig(trunk=TrunkConfig(widths=[16, 8]), heads=heads)
    model = MultiTaskModel(cfg, [*SOURCE_TASKS, TaskShape("regress2", "regression", 10)], seed=0)  # a group of two
    inputs = _inputs()
    inputs.model, inputs.source_config = model, {"model": cfg.model_dump(mode="json"), "meta": None}
    with torch.no_grad():
        for p in model.task_modules["regress"].head.parameters():
            p.add_(0.5)  # the source task's own part: not what a new task starts from
    features = model.trunk(inputs.train[0])
    shared = model.shared_heads["regression:1"]
    start = shared(features) if heads == "shared_plus_offset" else shared(features, torch.zeros(cfg.embedding_dim))
    built = build("finetune", inputs, 1, 4, seed=0)
    assert torch.equal(built.model.head(features), start)
    assert {n for n, _ in built.model.head.named_parameters()} and not torch.equal(
        model.task_modules["regress"].head(features), start)
    scratch = build("scratch", inputs, 1, 4, seed=0)
    assert not torch.allclose(scratch.model.head(scratch.model.trunk(inputs.train[0])), start)
    _, changed = _trained_names("linear_probe", inputs)
    assert changed == {n for n, _ in built.model.named_parameters() if n.startswith("head.")}


def test_meta_adapt_uses_the_inner_rule_and_anil_adapts_the_head_only():
    meta_tasks = [TaskShape("meta", "regression", 10)]
    inputs = _inputs(meta={"algorithm": "anil", "inner_lr": 0.5}, tasks=meta_tasks)
    built = build("meta_adapt", inputs, 1, 4, seed=0)
    assert built.rates and set(built.rates.values()) == {0.5}
    x, y = inputs.train
    loss = torch.nn.functional.mse_loss(built.model(x).squeeze(-1), y)
    grads = torch.autograd.grad(loss, list(built.model.head.parameters()))
    expected = [p.detach() - 0.5 * g for p, g in zip(built.model.head.parameters(), grads)]
    fit(built, inputs, steps=1, lr=123.0, eval_every=1)  # lr is not used: the inner rule is
    assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(built.model.head.parameters(), expected))
    _, changed = _trained_names("meta_adapt", inputs)
    assert changed == {n for n, _ in built.model.named_parameters() if n.startswith("head.")}


@pytest.mark.parametrize("strategy, target, message", [
    ("finetune", TaskShape("wide", "regression", 7), "only 'scratch' and 'adapter' map features"),
    ("meta_adapt", TaskShape("new", "regression", 10), "'meta_adapt' needs a source from `mtml meta-train`"),
    ("nearest_head", TaskShape("new", "classification", 10, 5), "'nearest_head' found no source head"),
])
def test_strategies_that_cannot_apply_say_why(strategy, target, message):
    with pytest.raises(InputError, match=message):
        check(strategy, _inputs(target=target), partial_layers=1)
    with pytest.raises(InputError, match="exceeds the trunk's 3 layers"):
        check("partial", _inputs(), partial_layers=4)


def test_strategy_names_come_from_the_registry_and_unknown_ones_are_refused():
    from distributed_mtml.transfer.strategies import STRATEGIES, chosen

    assert validate_config({}).transfer.strategies is None and chosen(None) == list(STRATEGIES)
    assert chosen(["finetune"]) == ["finetune"]
    with pytest.raises(InputError, match="transfer.strategies: unknown 'magic' \\(choose from: scratch, finetune"):
        chosen(validate_config({"transfer": {"strategies": ["finetune", "magic"]}}).transfer.strategies)


def test_meta_adapt_takes_meta_sgd_rates_from_the_learner():
    inputs = _inputs(meta={"algorithm": "metasgd", "inner_lr": 0.5}, tasks=[TaskShape("meta", "regression", 10)])
    built = build("meta_adapt", inputs, 1, 4, seed=0)
    learned = dict(zip(inputs.learner.adapted, inputs.learner.rates))
    assert set(built.trainable) == {n for n, _ in built.model.named_parameters()}  # Meta-SGD adapts everything
    for name, _ in built.model.head.named_parameters():
        assert torch.equal(built.rates[f"head.{name}"], learned[f"task_modules.meta.head.{name}"].detach())
    assert torch.equal(built.rates["trunk.0.weight"], learned["trunk.0.weight"].detach())


@pytest.mark.parametrize("architecture", ["mmoe", "cgc", "ple", "cross_stitch"])
def test_a_source_that_learned_how_tasks_relate_transfers_through_the_target_s_own_part(architecture):
    """The target gets what a new group gets (the source tasks' gates averaged, cross-stitch's
    mean column): finetune trains it with everything, linear_probe leaves it and the trunk
    frozen, nearest_head starts from the nearest task's own part and head, scratch builds the
    architecture anew; partial and adapter, which cut a stack of layers, say why not."""
    from distributed_mtml.architectures import ARCHITECTURES

    inputs = _inputs(architecture=architecture)
    known = [m.mix for m in inputs.model.task_modules.values()]
    built, changed = _trained_names("finetune", inputs)
    assert built.model.mix is not None and changed == {n for n, _ in built.model.named_parameters()}
    start = ARCHITECTURES[architecture].new_task_part(known)
    x = inputs.train[0]
    with torch.no_grad():
        fresh = build("finetune", inputs, 1, 4, seed=0).model
        shared = inputs.model.trunk(x)
        torch.testing.assert_close(fresh(x), fresh.head(start(x, shared)))  # the source's trunk, the averaged part
    built, changed = _trained_names("linear_probe", inputs)
    assert changed == {n for n, _ in built.model.named_parameters() if n.startswith("head.")}
    assert any(n.startswith("mix.") for n, _ in built.model.named_parameters()) == (architecture != "cross_stitch")
    built, changed = _trained_names("nearest_head", inputs)
    assert changed == {n for n, _ in built.model.named_parameters()} and built.model.mix is not None
    built, _ = _trained_names("scratch", inputs)
    assert built.model.mix is not None
    for strategy in ("partial", "adapter"):
        with pytest.raises(InputError, match=f"'{strategy}' works on a trunk that is one stack of layers; the source's "
                                             f"architecture '{architecture}' is not"):
            check(strategy, inputs, 1)
