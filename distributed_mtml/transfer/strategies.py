"""What each transfer strategy builds, and which of its parameters train.

Every strategy yields a `TargetModel` (input map -> trunk -> head) and the names of its
trainable parameters; everything else is frozen. Heads are new unless a strategy says
otherwise, built like the source's heads for the target's output width.

  scratch       the source architecture, freshly initialised; all of it trains
  finetune      the source trunk and a new head; all of it trains

A new head is the source's shared head of the target's type and width where the source shares
heads (`model.heads`: the tasks' common ground, offsets or embedding at zero), else fresh.
  linear_probe  the source trunk frozen, a new head
  partial       the top `partial_layers` linear layers of the trunk and a new head
  adapter       the source trunk frozen with a residual bottleneck adapter after every layer
                (starting as the identity) and a linear input map when the target's features
                differ ("feature mapping"); adapters, input map and head train
  meta_adapt    the meta-learned trunk and head, adapted by the source's own inner rule
                (plain SGD at its inner rate, Meta-SGD's learned rates, ANIL: the head only)
  nearest_head  the source trunk and a copy of the source head that fits the K examples best
                before any training (lowest loss); all of it trains
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from distributed_mtml.architectures import ARCHITECTURES
from distributed_mtml.config import ModelConfig
from distributed_mtml.errors import InputError
from distributed_mtml.models import META_TASK, build_trunk, new_task_head, task_loss
from distributed_mtml.transfer.source import TransferInputs


class Adapter(nn.Module):
    """x + up(relu(down(x))), with `up` zero-initialised: the frozen network is unchanged at start."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight), nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


class TargetModel(nn.Module):
    """input map -> trunk -> (the architecture's part for the target: its gate, its column) -> head."""

    def __init__(self, input_map: nn.Module, trunk: nn.Module, head: nn.Module, mix: nn.Module | None = None):
        super().__init__()
        self.input_map, self.trunk, self.head, self.mix = input_map, trunk, head, mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.input_map(x)
        shared = self.trunk(inputs)
        return self.head(shared if self.mix is None else self.mix(inputs, shared))


@dataclass
class Built:
    model: TargetModel
    trainable: list[str]
    rates: dict[str, torch.Tensor | float] | None = None  # meta_adapt: its SGD rates instead of Adam


def _linears(trunk: nn.Module) -> list[nn.Linear]:
    return [m for m in trunk.modules() if isinstance(m, nn.Linear)]


def _trunk_in(inputs: TransferInputs) -> int:
    return _linears(inputs.model.trunk)[0].in_features


def _model_config(inputs: TransferInputs) -> ModelConfig:
    return ModelConfig.model_validate(inputs.source_config["model"])


def _new_head(inputs: TransferInputs, seed: int) -> nn.Module:
    """The target's head: the source's shared head of its type where the source shares heads
    (`model.heads`), else a fresh one."""
    torch.manual_seed(seed)
    return new_task_head(_model_config(inputs), inputs.target, inputs.model.shared_heads, _trunk_in(inputs))


def _target_part(inputs: TransferInputs) -> nn.Module | None:
    """The target's part of a source architecture with task parts (`architectures/`): what the
    source's tasks' parts share, as for a new group (their gates averaged); None under `hard`."""
    make = ARCHITECTURES[_model_config(inputs).architecture].new_task_part
    return make([m.mix for m in inputs.model.task_modules.values()]) if make is not None else None


def _sequential(inputs: TransferInputs) -> bool:
    """Whether the source's trunk is one stack of layers (`hard`), which partial and adapter cut."""
    return _model_config(inputs).architecture == "hard"


def _compatible_heads(inputs: TransferInputs) -> list[str]:
    t = inputs.target
    return [n for n, s in inputs.model.tasks.items() if s.type == t.type and s.out_width == t.out_width]


def chosen(names: list[str] | None) -> list[str]:
    """`transfer.strategies` checked against the registry; None means every strategy."""
    unknown = [n for n in names or [] if n not in STRATEGIES]
    if unknown:
        raise InputError(f"transfer.strategies: unknown '{unknown[0]}' (choose from: {', '.join(STRATEGIES)})")
    return list(names or STRATEGIES)


def check(strategy: str, inputs: TransferInputs, partial_layers: int) -> None:
    """One clear InputError when `strategy` cannot apply to this source and target."""
    s, t, trunk_in = STRATEGIES[chosen([strategy])[0]], inputs.target, _trunk_in(inputs)
    if t.num_features != trunk_in and not s.maps_features:
        mapping = " and ".join(f"'{n}'" for n, other in STRATEGIES.items() if other.maps_features)
        raise InputError(f"transfer.strategies: '{strategy}' needs the target's features to match the source trunk's "
                         f"input ({t.num_features} vs {trunk_in}); only {mapping} map features")
    if s.needs_meta_source and not (inputs.learner is not None and _compatible_heads(inputs)):
        raise InputError(f"transfer.strategies: '{strategy}' needs a source from `mtml meta-train` whose head "
                         f"matches the target ({t.type}, {t.out_width} outputs)")
    if s.needs_source_head and not _compatible_heads(inputs):
        raise InputError(f"transfer.strategies: '{strategy}' found no source head of type {t.type} "
                         f"with {t.out_width} outputs")
    if s.needs_layer_stack and not _sequential(inputs):
        able = ", ".join(n for n, other in STRATEGIES.items()
                         if not other.needs_layer_stack and (inputs.learner is not None or not other.needs_meta_source))
        raise InputError(f"transfer.strategies: '{strategy}' works on a trunk that is one stack of layers; the source's "
                         f"architecture '{_model_config(inputs).architecture}' is not (use {able})")
    if "partial_layers" in s.settings and partial_layers > len(_linears(inputs.model.trunk)):
        raise InputError(f"transfer.partial_layers: {partial_layers} exceeds the trunk's "
                         f"{len(_linears(inputs.model.trunk))} layers")


def _nearest_head(inputs: TransferInputs) -> str:
    """The compatible source head with the lowest loss on the K examples, before any training."""
    x, y = inputs.train
    model = inputs.model
    with torch.no_grad():
        shared = model.trunk(x)
        losses = {n: float(task_loss(inputs.target, model.task_modules[n].head(model.task_modules[n].features(x, shared)), y))
                  for n in _compatible_heads(inputs)}
    return min(losses, key=losses.get)


def _adapted_trunk(trunk: nn.Module, width: int) -> nn.Sequential:
    """The trunk with an adapter after each layer's activation (after every Linear's block)."""
    layers: list[nn.Module] = []
    blocks = list(trunk)
    for i, module in enumerate(blocks):
        layers.append(module)
        ends_block = i + 1 == len(blocks) or isinstance(blocks[i + 1], nn.Linear)
        if ends_block:
            out = [m for m in blocks[: i + 1] if isinstance(m, nn.Linear)][-1].out_features
            layers.append(Adapter(out, width))
    return type(trunk)(*layers)  # a passthrough trunk stays one


@dataclass(frozen=True)
class Options:
    partial_layers: int
    adapter_width: int
    seed: int


def _scratch(inputs: TransferInputs, trunk: nn.Module, head: nn.Module, o: Options) -> Built:
    """Nothing of the source's weights: a fresh trunk and a fresh head of the target's own."""
    torch.manual_seed(o.seed)
    cfg = _model_config(inputs)
    fresh = build_trunk(cfg, [inputs.target])
    width = _linears(fresh)[0].in_features
    part = ARCHITECTURES[cfg.architecture].task_part
    model = TargetModel(nn.Identity(), fresh, new_task_head(cfg, inputs.target, nn.ModuleDict(), width),
                        part(cfg, width, 0, 1) if part is not None else None)
    return Built(model, [n for n, _ in model.named_parameters()])


def _finetune(inputs: TransferInputs, trunk: nn.Module, head: nn.Module, o: Options) -> Built:
    model = TargetModel(nn.Identity(), trunk, head, _target_part(inputs))
    return Built(model, [n for n, _ in model.named_parameters()])


def _linear_probe(inputs: TransferInputs, trunk: nn.Module, head: nn.Module, o: Options) -> Built:
    """The representation frozen: the trunk and, under a gated architecture, the target's gate."""
    model = TargetModel(nn.Identity(), trunk, head, _target_part(inputs))
    return Built(model, [n for n, _ in model.named_parameters() if n.startswith("head.")])


def _partial(inputs: TransferInputs, trunk: nn.Module, head: nn.Module, o: Options) -> Built:
    built = _linear_probe(inputs, trunk, head, o)
    top = {id(p) for layer in _linears(trunk)[-o.partial_layers:] for p in layer.parameters()}
    return Built(built.model, built.trainable + [f"trunk.{n}" for n, p in trunk.named_parameters() if id(p) in top])


def _adapter(inputs: TransferInputs, trunk: nn.Module, head: nn.Module, o: Options) -> Built:
    mismatch = inputs.target.num_features != _trunk_in(inputs)
    torch.manual_seed(o.seed)
    input_map = nn.Linear(inputs.target.num_features, _trunk_in(inputs)) if mismatch else nn.Identity()
    model = TargetModel(input_map, _adapted_trunk(trunk, o.adapter_width), head)
    trainable = [n for n, _ in model.named_parameters()
                 if n.startswith(("head.", "input_map.")) or ".down." in n or ".up." in n]
    return Built(model, trainable)


def _nearest(inputs: TransferInputs, trunk: nn.Module, head: nn.Module, o: Options) -> Built:
    nearest = inputs.model.task_modules[_nearest_head(inputs)]
    chosen_head = nearest.head.standalone()  # shared part included
    model = TargetModel(nn.Identity(), trunk, chosen_head, copy.deepcopy(nearest.mix))  # and its gate or column
    return Built(model, [n for n, _ in model.named_parameters()])


def _meta_adapt(inputs: TransferInputs, trunk: nn.Module, head: nn.Module, o: Options) -> Built:
    """The meta-learned initialisation adapted by the learner's own inner rule: the parameters it
    adapts (ANIL: the head) at its rates (Meta-SGD: learned), renamed to TargetModel's names."""
    learner = inputs.learner
    model = TargetModel(nn.Identity(), trunk, copy.deepcopy(learner.model.task_modules[META_TASK].head))
    rename = {f"task_modules.{META_TASK}.head.{n}": f"head.{n}" for n, _ in model.head.named_parameters()}
    rename.update({f"trunk.{n}": f"trunk.{n}" for n, _ in trunk.named_parameters()})
    rates = {rename[n]: (r.detach().clone() if isinstance(r, torch.Tensor) else r) for n, r in learner.rate().items()}
    return Built(model, [rename[n] for n in learner.adapted], rates)


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its build (source trunk copy and a new head in, `Built` out), the
    settings it reads (logged as its run's params), and what it needs of source and target."""

    summary: str
    build: Callable[[TransferInputs, nn.Module, nn.Module, Options], Built]
    settings: tuple[str, ...] = ("lr",)
    maps_features: bool = False  # works when the target's features differ from the source's
    needs_meta_source: bool = False
    needs_source_head: bool = False  # a source head of the target's type and width
    needs_layer_stack: bool = False  # cuts the trunk's layers: a `hard` source only


STRATEGIES: dict[str, Strategy] = {
    "scratch": Strategy("the source's architecture with new weights: the baseline every other must beat",
                        _scratch, maps_features=True),
    "finetune": Strategy("every parameter of the source trunk and a new head trains", _finetune),
    "linear_probe": Strategy("the trunk frozen, a new head trains", _linear_probe),
    "partial": Strategy("the top transfer.partial_layers trunk layers and a new head train", _partial,
                        settings=("lr", "partial_layers"), needs_layer_stack=True),
    "adapter": Strategy("residual bottleneck adapters on the frozen trunk, starting as the identity (plus a linear "
                        "input map when the target's features differ)", _adapter, settings=("lr", "adapter_width"),
                        maps_features=True, needs_layer_stack=True),
    "meta_adapt": Strategy("a meta-learned source's own inner rule: its rate, Meta-SGD's rates, ANIL's head-only step",
                           _meta_adapt, settings=(), needs_meta_source=True),
    "nearest_head": Strategy("the source head of the target's kind that fits the K rows best, then fine-tuned",
                             _nearest, needs_source_head=True),
}


def build(strategy: str, inputs: TransferInputs, partial_layers: int, adapter_width: int, seed: int) -> Built:
    check(strategy, inputs, partial_layers)
    options = Options(partial_layers, adapter_width, seed)
    return STRATEGIES[strategy].build(inputs, copy.deepcopy(inputs.model.trunk), _new_head(inputs, seed), options)
