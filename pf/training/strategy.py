"""``trainer.strategy``: how ranks share the model, and the full-state checkpoints of either way.

    ddp    DistributedDataParallel: every rank holds the whole model, optimizer state and EMA;
           gradients are all-reduced (``no_sync`` on all but the last micro-batch).
    fsdp   FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients, optimizer state
           and the EMA sharded over the ranks, gathered unit by unit for the forward and backward.

FSDP's units are each block's parts (``adaLN_modulation``, ``attn``, ``mlp``: a block computes
the *next* module's modulation before that module runs, so a whole block cannot be one unit),
the final layer's parts, and the rest (embedders) at the root. Checkpoints are always the
full state, in the single-process layout (optimizer state keyed by parameter index), so a file
written by any strategy and any number of ranks loads into any other. The EMA stays sharded
while training and is gathered whole (on rank 0) only for validation, pictures, FID and files.
fp16 loss scaling is refused with fsdp (its overflow check sees one shard per rank).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from pf.models.checkpoint import FORMAT, load_state_dict_checked
from pf.training.checkpointing import training_checkpoint, training_state
from pf.training.distributed import Dist
from pf.training.ema import EMA
from pf.training.memory import checkpoint_blocks

STRATEGIES = ("ddp", "fsdp")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on rank 0's CPU


class _Forward:
    """Calls the (DDP-wrapped and/or compiled) model; attributes come from the plain module,
    so the objective can read ``patch_size`` and ``predict_uncertainty``."""

    def __init__(self, call, module):
        self._call, self._module = call, module

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """FSDP's units, inner first: every parameter-holding child of each block and of the final layer."""
    units = []
    for parent in [*getattr(model, "blocks", []), *([model.final_layer] if hasattr(model, "final_layer") else [])]:
        units += [child for child in parent.children() if any(True for _ in child.parameters())]
    return units


def _trainable_names(model: torch.nn.Module) -> list[str]:
    """Parameter names in the optimizer's order (its state's integer keys)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _by_index(state: dict, names: list[str]) -> dict:
    """DCP's name-keyed optimizer state -> ``optimizer.state_dict()``'s index-keyed layout."""
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in state["param_groups"]]}


def _by_name(state: dict, names: list[str]) -> dict:
    return {"state": {names[int(k)]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(k)] for k in g["params"]]} for g in state["param_groups"]]}


class Strategy:
    """The rank-sharing of one run. Order of use: ``shard`` (before the optimizer exists), ``ema``,
    ``load`` (resume), ``wrap`` (the forward the step calls), then ``states`` per checkpoint."""

    def __init__(self, name: str, d: Dist, device: torch.device, precision: str = "fp32"):
        if name not in STRATEGIES:
            raise ValueError(f"trainer.strategy={name!r}: expected one of {', '.join(STRATEGIES)}")
        if name == "fsdp" and precision == "fp16":
            raise ValueError("trainer.strategy=fsdp with trainer.precision=fp16: loss scaling would check one "
                             "shard per rank; use precision=bf16 (or fp32) with fsdp")
        self.name, self.d, self.device = name, d, device
        self.sharded = name == "fsdp" and d.enabled  # one process: nothing to shard
        self.model_class = None

    def shard(self, model: torch.nn.Module, activation_checkpointing: bool = False) -> torch.nn.Module:
        self.model_class = type(model)  # fully_shard makes the module an instance of an FSDP subclass
        if activation_checkpointing:
            checkpoint_blocks(model)
        if self.sharded:
            for unit in shard_units(model):
                fully_shard(unit)
            fully_shard(model)
            # the model returns v as a view of its output (the logvar channels are the rest); nothing
            # in the objective changes it in place, which is what this warning is about
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        return model

    def ema(self, model: torch.nn.Module, decay: float, warmup: bool) -> EMA:
        return ShardedEMA(model, decay, warmup, self) if self.sharded else EMA(model, decay, warmup)

    def wrap(self, model: torch.nn.Module, compile_: bool = False):
        """The forward the step calls, and the context that keeps a backward's gradients unsynced."""
        call, skip_sync = model, None
        if self.sharded:
            skip_sync = lambda: _no_gradient_sync(model)  # noqa: E731
        elif self.d.enabled:
            call = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            skip_sync = call.no_sync
        if compile_:
            call = torch.compile(call)
        return _Forward(call, model), skip_sync

    # ------------------------------------------------------------ full states
    def checkpoint(self, model, ema, optimizer, scheduler, step: int, rng: list[dict], train_config: dict):
        """The training checkpoint (``pf.training.checkpointing``'s layout, whatever the strategy)
        on rank 0, None elsewhere. Every rank calls it (FSDP gathers)."""
        if not self.sharded:
            if not self.d.is_main:
                return None
            return training_checkpoint(model, ema, optimizer, scheduler, step, rng, train_config)
        weights = get_model_state_dict(model, options=FULL)
        optim = get_optimizer_state_dict(model, optimizer, options=FULL)
        ema_state = ema.state_dict()
        if not self.d.is_main:
            return None
        return {"format": FORMAT, "model_class": self.model_class.__name__, "config": model.config(),
                "state_dict": weights, "ema": ema_state,
                **training_state(_by_index(optim, _trainable_names(model)), ema, scheduler, step, rng, train_config)}

    def load(self, model, optimizer, weights: dict, optim: dict, source: str) -> None:
        """Full states (any strategy's file) into this run's model and optimizer; every rank calls it."""
        if not self.sharded:
            load_state_dict_checked(model, weights, source=source)
            optimizer.load_state_dict(optim)
            return
        own = set(model.state_dict())
        missing, unexpected = sorted(own - set(weights)), sorted(set(weights) - own)
        if missing or unexpected:
            raise ValueError(f"{source} does not match the model: missing keys {missing}, unexpected keys {unexpected}")
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, _by_name(optim, _trainable_names(model)),
                                 options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def _no_gradient_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class ShardedEMA(EMA):
    """The EMA as a second FSDP-sharded copy (the same units), updated shard by shard;
    ``whole()`` gathers it into a plain model on rank 0 (every rank calls it)."""

    def __init__(self, model, decay: float, warmup: bool, strategy: Strategy):
        # ``model`` is sharded already: the copy is built whole from its config and given the
        # gathered weights, then sharded the same way
        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        plain = strategy.model_class(**model.config()).to(strategy.device)
        plain.load_state_dict(whole)
        super().__init__(plain, decay, warmup)
        for unit in shard_units(self.model):
            fully_shard(unit)
        fully_shard(self.model)
        self.strategy, self._whole = strategy, None

    def whole(self):
        state = get_model_state_dict(self.model, options=FULL)
        if not self.strategy.d.is_main:
            return None
        if self._whole is None:
            self._whole = self.strategy.model_class(**self.model.config()).to(self.strategy.device)
            self._whole.eval().requires_grad_(False)
        self._whole.load_state_dict(state)
        return self._whole

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model, options=FULL)

    def load_state_dict(self, state: dict, updates: int) -> None:
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
        self.updates = int(updates)
