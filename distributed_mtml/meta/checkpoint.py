"""Meta-training checkpoints, in the common layout (`runtime/checkpoint.py`) plus two files.

  state.pt          epoch = iterations done - 1, kind "meta", the plan
  trunk.pt          the trunk
  task_meta.pt      the shared head (adapter + head): every new task's starting point
  rates.pt          the learner's own state (Meta-SGD's learned rates; empty otherwise)
  optim.pt          the outer optimiser (identical on every rank: all see the same gradients)

So `mtml evaluate` and transfer load a meta-learned model like a multi-task one: a trunk and
one head named "meta". Only rank 0 writes; everything loads with `weights_only=True`.
"""

from __future__ import annotations

import os

import torch

from distributed_mtml import __version__
from distributed_mtml.meta.algorithms import META_TASK, MetaLearner
from distributed_mtml.models import MultiTaskModel
from distributed_mtml.runtime.checkpoint import STATE_FILE, TRUNK_FILE, load_file, load_into, load_state, task_file

RATES_FILE, OPTIM_FILE = "rates.pt", "optim.pt"


def _load(directory: str, name: str) -> dict:
    return load_file(os.path.join(directory, name))


def save_meta_state(directory: str, iteration: int, plan: dict, learner: MetaLearner, optimizer,
                    monitor: dict | None = None, adapt_steps: int | None = None) -> None:
    """The learner, its optimiser and the run's state; `adapt_steps`: the inner steps that did
    best on the validation tasks (`meta.worker._validation`), a new task's default."""
    state = {"epoch": iteration - 1, "iterations_done": iteration, "kind": "meta", "plan": plan, "version": __version__,
             "monitor": monitor or {}, **({} if adapt_steps is None else {"adapt_steps": adapt_steps})}
    torch.save(state, os.path.join(directory, STATE_FILE))
    torch.save(learner.model.trunk.state_dict(), os.path.join(directory, TRUNK_FILE))
    torch.save(learner.model.task_modules[META_TASK].state_dict(), os.path.join(directory, task_file(META_TASK)))
    torch.save(learner.rates.state_dict(), os.path.join(directory, RATES_FILE))
    torch.save(optimizer.state_dict(), os.path.join(directory, OPTIM_FILE))


def restore_meta_state(directory: str, learner: MetaLearner, optimizer) -> tuple[int, dict]:
    """Loads everything; returns the iterations already done and the monitor's saved state."""
    load_into(learner.model.trunk, os.path.join(directory, TRUNK_FILE))
    load_into(learner.model.task_modules[META_TASK], os.path.join(directory, task_file(META_TASK)))
    load_into(learner.rates, os.path.join(directory, RATES_FILE))
    optimizer.load_state_dict(_load(directory, OPTIM_FILE))
    state = load_state(directory)
    return int(state["iterations_done"]), state.get("monitor", {})


def build_learner(plan_dict: dict) -> MetaLearner:
    """A freshly initialised learner of a plan: the same on every rank for the same seed."""
    from distributed_mtml.meta.plan import MetaPlan

    plan = MetaPlan.model_validate(plan_dict)
    cfg = plan.config
    # its one head is every task's starting point, shared by construction: `model.heads` is for
    # multi-task training's many heads
    model = MultiTaskModel(cfg.model.model_copy(update={"heads": "separate"}), [plan.shape()], cfg.training.seed,
                           {META_TASK: plan.prep} if plan.prep is not None else None)
    return MetaLearner(model, cfg.meta.algorithm, cfg.meta.inner_lr, cfg.training.seed)


def load_learner(directory: str) -> tuple[MetaLearner, dict]:
    """The meta-learned model and its rates from a checkpoint (or model artifact), and its plan."""
    state = load_state(directory)
    learner = build_learner(state["plan"])
    load_into(learner.model.trunk, os.path.join(directory, TRUNK_FILE))
    load_into(learner.model.task_modules[META_TASK], os.path.join(directory, task_file(META_TASK)))
    load_into(learner.rates, os.path.join(directory, RATES_FILE))
    learner.eval()
    return learner, state["plan"]
