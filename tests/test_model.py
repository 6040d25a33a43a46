import pytest
import torch

from distributed_mtml.config import ModelConfig, TrunkConfig
from distributed_mtml.errors import InputError
from distributed_mtml.metrics import binary_auc, classification_metrics, regression_metrics
from distributed_mtml.models import MultiTaskModel, TaskShape, build_task_modules, task_loss
from distributed_mtml.runtime.placement import place_tasks

TASKS = [TaskShape("c", "classification", 10, 3), TaskShape("r", "regression", 10)]


def test_article_model_shapes_and_no_adapters_for_equal_widths():
    model = MultiTaskModel(ModelConfig(), TASKS)
    linears = [m for m in model.trunk if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 100), (100, 50)]
    x = torch.randn(4, 10)
    assert model("c", x).shape == (4, 3) and model("r", x).shape == (4, 1)
    assert all(isinstance(m.adapter, torch.nn.Identity) for m in model.task_modules.values())


def test_adapters_map_different_feature_widths_into_the_trunk():
    tasks = [TaskShape("a", "regression", 3), TaskShape("b", "regression", 7)]
    model = MultiTaskModel(ModelConfig(trunk=TrunkConfig(widths=[16])), tasks)
    assert model.trunk[0].in_features == 7
    assert model.task_modules["a"].adapter.in_features == 3
    assert model("a", torch.randn(2, 3)).shape == (2, 1)


def test_trunk_options_layer_norm_dropout_activation():
    cfg = ModelConfig(trunk=TrunkConfig(widths=[8, 8], activation="gelu", dropout=0.2, layer_norm=True))
    kinds = [type(m).__name__ for m in MultiTaskModel(cfg, TASKS).trunk]
    assert kinds == ["Linear", "LayerNorm", "GELU", "Dropout"] * 2


def test_head_initialisation_does_not_depend_on_placement():
    alone = build_task_modules(ModelConfig(), TASKS, seed=3, only=["r"])
    together = build_task_modules(ModelConfig(), TASKS, seed=3)
    for a, b in zip(alone["r"].parameters(), together["r"].parameters()):
        assert torch.equal(a, b)


def test_losses_are_cross_entropy_and_squared_error():
    logits, labels = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])
    assert task_loss(TASKS[0], logits, labels).item() == pytest.approx(-torch.log_softmax(logits, -1)[0, 0].item())
    assert task_loss(TASKS[1], torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])).item() == pytest.approx(2.5)


def test_placement_round_robin_and_limits():
    assert place_tasks(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    assert place_tasks(["a", "b"], 1) == [["a", "b"]]
    with pytest.raises(InputError, match="scaling.num_workers: 3 workers for 2 tasks"):
        place_tasks(["a", "b"], 3)


@pytest.mark.parametrize("seed", range(5))
def test_rank_auc_equals_the_pairwise_definition_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (300,), generator=g).float() / 5  # many ties
    labels = torch.randint(0, 2, (300,), generator=g)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg).double().sum() + 0.5 * (pos[:, None] == neg).double().sum()) / (len(pos) * len(neg))
    assert binary_auc(scores, labels) == pytest.approx(float(pairwise), abs=1e-12)
    assert binary_auc(torch.full((4,), 0.3), torch.tensor([0, 1, 0, 1])) == 0.5  # all tied


def test_rank_auc_of_half_a_million_rows_needs_no_pairwise_matrix():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (500_000,), generator=g)
    scores = labels + torch.randn(500_000, generator=g)  # pairwise: 6e10 comparisons, 500 GB
    assert 0.7 < binary_auc(scores, labels) < 0.8  # Phi(1 / sqrt(2)) = 0.760


def test_metrics_known_answers():
    assert binary_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    m = classification_metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
    assert m["accuracy"] == pytest.approx(2 / 3) and m["auc"] == pytest.approx(1.0)
    r = regression_metrics(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.0, 2.0, 5.0]))
    assert r["mse"] == pytest.approx(4 / 3) and r["mae"] == pytest.approx(2 / 3)
    assert r["r2"] == pytest.approx(1 - (4 / 3) / (26 / 9))  # target variance 26/9
