"""Meta-learning: each algorithm's update against its hand-derived formula, the batched
implementation against the per-task loop, and the evaluation protocol on a fixed model."""

import math

import pytest
import torch
from torch.func import functional_call

from distributed_mtml.config import ModelConfig, TrunkConfig
from distributed_mtml.meta.algorithms import (
    ALGORITHMS,
    META_TASK,
    MetaLearner,
    adapt,
    adaptation_curve,
    meta_gradient,
    meta_gradient_loop,
)
from distributed_mtml.meta.evaluate import few_shot_curve
from distributed_mtml.meta.tasks import Episodes, SinusoidFamily, SuiteEpisodes, episode_generator
from distributed_mtml.models import MultiTaskModel, TaskShape, task_loss

ALPHA = 0.05


def _learner(algorithm, widths=(3,), kind="regression", features=1, classes=None):
    cfg = ModelConfig(trunk=TrunkConfig(widths=list(widths), activation="tanh"), heads="separate")
    model = MultiTaskModel(cfg, [TaskShape(META_TASK, kind, features, classes)], seed=0)
    return MetaLearner(model, algorithm, ALPHA, seed=0).double()


def _episodes(n=3, shots=4, query=5):
    return SinusoidFamily(shots, query).sample(episode_generator(0, 1, 2), n)


def _flat_loss(learner, names, shapes):
    """L(theta_flat, x, y): the model as a function of one flat parameter vector."""
    def loss(flat, x, y):
        params, offset = {}, 0
        for n, shape in zip(names, shapes):
            size = math.prod(shape)
            params[n] = flat[offset: offset + size].view(shape)
            offset += size
        return task_loss(learner.shape, functional_call(learner.model, params, (META_TASK, x)), y)
    return loss


def _by_hand(learner, ep):
    """The expected meta-gradient, from the closed forms with explicit Hessians (one inner step):
    maml     (I - a H_s) gq                     fomaml  gq
    anil     (I - a P H_s) gq, P masks the head  reptile a gs
    metasgd  theta: (I - H_s diag(r)) gq ; rates: -gs * gq
    with gs = grad L_s(theta), H_s its Hessian, gq = grad L_q(phi), phi = theta - rate * gs."""
    named = dict(learner.model.named_parameters())
    names = list(named)
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    loss = _flat_loss(learner, names, shapes)
    algo = learner.algorithm
    mask = torch.cat([torch.full((named[n].numel(),), float(n in learner.adapted), dtype=theta.dtype) for n in names])
    if algo.learned_rates:
        rate = torch.cat([r.detach().reshape(-1) for r in learner.rates])
    else:
        rate = ALPHA * mask
    total_theta, total_rate = torch.zeros_like(theta), torch.zeros_like(theta)
    for b in range(len(ep)):
        x_s, y_s, x_q, y_q = ep.xs[b].double(), ep.ys[b].double(), ep.xq[b].double(), ep.yq[b].double()
        gs = torch.autograd.functional.jacobian(lambda t, x=x_s, y=y_s: loss(t, x, y), theta)
        hs = torch.autograd.functional.hessian(lambda t, x=x_s, y=y_s: loss(t, x, y), theta)
        phi = theta - rate * gs
        gq = torch.autograd.functional.jacobian(lambda t, x=x_q, y=y_q: loss(t, x, y), phi)
        if algo.reptile:
            total_theta += rate * gs
        elif algo.first_order:
            total_theta += gq
        else:
            total_theta += gq - hs @ (rate * gq)  # (I - H diag(rate)) gq; rate is 0 off the adapted entries
            total_rate += -gs * gq
    return total_theta / len(ep), total_rate / len(ep)


@pytest.mark.parametrize("algorithm", sorted(a for a in ALGORITHMS if not ALGORITHMS[a].closed_form))
def test_meta_gradient_matches_the_hand_derived_update(algorithm):
    learner, ep = _learner(algorithm), _episodes()
    ep = Episodes(*(t.double() for t in (ep.xs, ep.ys, ep.xq, ep.yq)))
    meta_gradient(learner, ep, steps=1, total_tasks=len(ep))
    got = torch.cat([p.grad.reshape(-1) for p in learner.model.parameters()])
    want_theta, want_rate = _by_hand(learner, ep)
    assert torch.allclose(got, want_theta, atol=1e-10), (got - want_theta).abs().max()
    if learner.algorithm.learned_rates:
        got_rate = torch.cat([r.grad.reshape(-1) for r in learner.rates])
        assert torch.allclose(got_rate, want_rate, atol=1e-10)


def test_ridge_head_adapts_to_the_minimiser_of_the_penalised_support_loss():
    """The closed-form head is the last layer minimising ||y - F w||^2 + sum p_i (w_i - w0_i)^2
    on the support rows: the penalised loss's gradient there is zero, and with no steps nothing moves."""
    learner, ep = _learner("ridge_head", widths=(8,)), _episodes(shots=3)
    with torch.no_grad():
        learner.rates[0].copy_(torch.linspace(-1, 2, len(learner.rates[0])))
    params = {n: p.detach() for n, p in learner.params().items()}
    xs, ys = ep.xs[0].double(), ep.ys[0].double()
    fast = adapt(learner, params, xs, ys, steps=3, first_order=False)
    names = [f"task_modules.{META_TASK}.head.1.weight", f"task_modules.{META_TASK}.head.1.bias"]
    last = [fast[n].clone().requires_grad_() for n in names]
    out = learner.outputs({**fast, **dict(zip(names, last))}, xs).squeeze(-1)
    shift = torch.cat([(w - params[n]).reshape(-1) for w, n in zip(last, names)])
    penalised = ((out - ys) ** 2).sum() + (torch.exp(learner.rates[0].detach()) * shift**2).sum()
    for g in torch.autograd.grad(penalised, last):
        assert g.abs().max() < 1e-9
    assert all(torch.equal(fast[n], params[n]) for n in params if n not in names)
    assert all(torch.equal(v, params[n]) for n, v in adapt(learner, params, xs, ys, 0, False).items())


def test_inner_step_is_plain_sgd_on_the_adapted_parameters_only():
    for algorithm in ("maml", "anil"):
        learner, ep = _learner(algorithm), _episodes()
        params = {n: p.detach() for n, p in learner.params().items()}
        fast = adapt(learner, params, ep.xs[0].double(), ep.ys[0].double(), steps=1, first_order=True)
        grads = torch.autograd.grad(learner.loss(learner.params(), ep.xs[0].double(), ep.ys[0].double()),
                                    list(learner.params().values()))
        for (n, p), g in zip(params.items(), grads):
            expected = p - ALPHA * g if n in learner.adapted else p
            assert torch.allclose(fast[n], expected, atol=1e-12), (algorithm, n)
    assert all(n.startswith(f"task_modules.{META_TASK}.head.") for n in _learner("anil").adapted)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_batched_and_per_task_loop_give_the_same_meta_gradient(algorithm):
    learner, ep = _learner(algorithm, widths=(16, 16)), _episodes(n=6)
    ep = Episodes(*(t.double() for t in (ep.xs, ep.ys, ep.xq, ep.yq)))
    batched = meta_gradient(learner, ep, steps=2, total_tasks=10)
    g_batched = [p.grad.clone() for p in learner.parameters()]
    loop = meta_gradient_loop(learner, ep, steps=2, total_tasks=10)
    assert torch.allclose(batched, loop, atol=1e-10)
    for a, b in zip(g_batched, [p.grad for p in learner.parameters()]):
        assert torch.allclose(a, b, atol=1e-10)


def test_classification_episodes_from_a_suite_adapt_in_one_batch():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    tasks = {"a": (x, (x[:, 0] > 0).long()), "b": (x, (x[:, 1] > 0).long())}
    ep = SuiteEpisodes(tasks, shots=6, query=4).sample(episode_generator(0, 0, 0), 5)
    assert ep.xs.shape == (5, 6, 3) and ep.yq.shape == (5, 4) and ep.ys.dtype == torch.long
    learner = _learner("maml", kind="classification", features=3, classes=2).float()
    losses = meta_gradient(learner, ep, steps=1, total_tasks=5)
    assert losses.shape == (5,) and all(p.grad is not None for p in learner.parameters())
    curve = adaptation_curve(learner, ep, 2)
    assert set(curve) == {"loss", "accuracy"} and curve["accuracy"].shape == (5, 3)


def test_episode_streams_are_reproducible_and_distinct():
    fam = SinusoidFamily(5, 5)
    a, b = fam.sample(episode_generator(0, 0, 7), 4), fam.sample(episode_generator(0, 0, 7), 4)
    c = fam.sample(episode_generator(0, 1, 7), 4)
    assert torch.equal(a.xs, b.xs) and not torch.equal(a.xs, c.xs)
    assert a.xs.min() >= -5 and a.xs.max() <= 5 and a.ys.abs().max() <= 5


def test_evaluation_protocol_on_a_fixed_model():
    """A model whose output is 0 everywhere: the loss before adaptation is mean(y^2) per task,
    the interval is Student's t(n - 1) std / sqrt(n), and one step equals a hand-made adaptation."""
    learner = _learner("maml").float()
    with torch.no_grad():
        for p in learner.model.task_modules[META_TASK].head.parameters():
            p.zero_()
    ep = SinusoidFamily(5, 7).sample(episode_generator(1, 5, 7), 50)
    curve = few_shot_curve(learner, ep, steps=1, chunk=16)["loss"]
    before = (ep.yq ** 2).mean(1).double()
    assert curve[0][0] == pytest.approx(float(before.mean()), rel=1e-5)
    assert curve[0][1] == pytest.approx(2.0096 * float(before.std()) / math.sqrt(50), rel=1e-4)  # t(49) 97.5%
    after = []
    for b in range(50):
        params = learner.params()
        g = torch.autograd.grad(learner.loss(params, ep.xs[b], ep.ys[b]), list(params.values()))
        fast = {n: (p - ALPHA * gi).detach() for (n, p), gi in zip(params.items(), g)}
        after.append(learner.loss(fast, ep.xq[b], ep.yq[b]).item())
    assert curve[1][0] == pytest.approx(sum(after) / 50, rel=1e-4)


def test_meta_progress_line_says_rate_loss_and_time_left(capsys):
    from distributed_mtml.meta.worker import Progress

    progress = Progress(done=100, total=1100, every_s=0.0)
    progress.tick(600, 0.25)
    line = capsys.readouterr().out
    assert line.startswith("[mtml] iteration 600/1100 | train/meta/loss 0.2500 |") and "it/s" in line and "s left" in line
    progress.tick(1100, 0.2)  # the last iteration is the final report's to announce
    assert capsys.readouterr().out == ""
