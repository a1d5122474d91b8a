"""The typed schema of ``python -m pf.train``'s config: every key, its type and what it allows.

``check_config(cfg)`` runs before anything is built. A wrong type, a value out of range, an
unknown choice, an unknown or missing key stops the run with one :class:`ConfigError` line
that names the key, the value and what is allowed::

    trainer.lr=abc: expected a number > 0
    trainer.timesteps.name='ltgg': expected one of independent, logit_normal, ltg, ...
    unknown config key trainer.bogus (trainer takes: kind, timesteps, nll_weight, ...)

The schema is dataclasses (one per group); a field's ``metadata`` holds its range
(``lo``/``hi`` and whether they are open) or its ``choices``. Hydra's group options
(``model=...``) and key names on the command line are checked by :func:`check_overrides`
before hydra composes.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from pf import samplers, timesteps
from pf.data.captions import CAPTION_DATA
from pf.models.presets import PRESET_SIZES, T2I_PRESET_SIZES
from pf.text.encoders import ENCODER_NAMES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "trainer", "sampler", "data", "experiment")


class ConfigError(ValueError):
    """The config cannot run: a key's type, range or choice, or an unknown key."""


def _rng(lo=None, hi=None, lo_open=False, hi_open=False, **more):
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, **more}


def _f(default, **meta):
    return field(default=default, metadata=meta)


def _choices(*values):
    return {"choices": values}


def _timestep_names():
    return tuple(sorted(timesteps.SAMPLERS))


def _sampler_names():
    return tuple(sorted(samplers.SAMPLERS))


def _model_names():
    return (*PRESET_SIZES, *(f"PFT2I-{k}" for k in T2I_PRESET_SIZES))


def _data_names():
    return ("digits", "fashion_mnist", "mnist_format", "folder", "latents", "custom", *CAPTION_DATA)


@dataclass
class ModelConfig:
    family: str = _f("dit", **_choices("dit", "t2i"))
    name: str = _f("Tiny/2", choices=_model_names)
    input_size: typing.Optional[int] = _f(16, **_rng(1))  # null: from the data
    in_channels: typing.Optional[int] = _f(1, **_rng(1))
    num_classes: typing.Optional[int] = _f(None, **_rng(1))
    class_dropout_prob: float = _f(0.1, **_rng(0.0, 1.0, hi_open=True))


@dataclass
class TimestepsConfig:
    name: str = _f("ltg", choices=_timestep_names)
    loc: typing.Optional[float] = None
    scale: typing.Optional[float] = _f(None, **_rng(0.0, lo_open=True))
    std: typing.Optional[float] = _f(None, **_rng(0.0, lo_open=True))


class RepaConfig:
    enabled: bool = False
    encoder: str = "classifier"  # a registered encoder (classifier | dinov2 | timm | ...) or "package.module:function"
    weights: typing.Optional[str] = None
    repo: typing.Optional[str] = None
    model: typing.Optional[str] = None
    resolution: typing.Optional[int] = _f(None, **_rng(1))
    encoder_depth: int = _f(8, **_rng(1))
    projector_dim: int = _f(2048, **_rng(1))


# the weight of the alignment term, config key trainer.repa.lambda (no generated __init__: a
# keyword cannot be a parameter or attribute name in generated code; the schema only reads the fields)
RepaConfig.__annotations__["lambda"] = float
setattr(RepaConfig, "lambda", _f(0.5, **_rng(0.0)))
RepaConfig = dataclass(init=False, repr=False, eq=False)(RepaConfig)


@dataclass
class TrainerConfig:
    kind: str = _f("pf", **_choices("pf", "fm"))
    timesteps: TimestepsConfig = field(default_factory=TimestepsConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    nll_weight: float = _f(0.01, **_rng(0.0))
    max_steps: int = _f(400000, **_rng(0))  # 0: an init-only run (the starting weights as checkpoint)
    batch_size: int = _f(64, **_rng(1))
    lr: float = _f(1e-4, **_rng(0.0, lo_open=True))
    weight_decay: float = _f(0.0, **_rng(0.0))
    betas: typing.List[float] = _f((0.9, 0.999), **_rng(0.0, 1.0, hi_open=True), length=2)
    warmup_steps: int = _f(1000, **_rng(0))
    lr_schedule: str = _f("constant", **_choices("constant", "cosine", "wsd"))
    min_lr: float = _f(0.0, **_rng(0.0))
    decay_fraction: float = _f(0.2, **_rng(0.0, 1.0, lo_open=True))
    grad_accum: int = _f(1, **_rng(1))
    grad_clip: float = _f(1.0, **_rng(0.0, lo_open=True))
    ema_decay: float = _f(0.9999, **_rng(0.0, 1.0, hi_open=True))
    ema_warmup: bool = False
    precision: str = _f("bf16", **_choices("bf16", "fp16", "fp32"))
    tf32: bool = True
    compile: bool = False
    activation_checkpointing: bool = False
    strategy: str = _f("ddp", **_choices("ddp", "fsdp"))
    log_every: int = _f(100, **_rng(1))
    val_every: int = _f(5000, **_rng(1))
    ckpt_every: int = _f(5000, **_rng(1))
    keep_every: int = _f(50000, **_rng(1))
    sample_every: int = _f(10000, **_rng(1))
    progress: bool = True
    fid_every: int = _f(0, **_rng(0))  # 0: off
    fid_samples: int = _f(1000, **_rng(2))
    fid_reference: int = _f(10000, **_rng(2))
    fid_weights: typing.Optional[str] = None
    fid_extractor: str = _f("classifier", **_choices("classifier", "inception"))
    fid_reference_stats: typing.Optional[str] = None  # inception: an ADM reference .npz instead of the training images
    # targets of pf.training.loggers, "jsonl,tensorboard" or [jsonl,tensorboard]: checked by parse_log_targets
    log: typing.Any = "jsonl"


@dataclass
class SamplerConfig:
    name: str = _f("euler_pf", choices=_sampler_names)
    params: dict = field(default_factory=dict)  # the sampler's own; checked by building it
    steps: int = _f(100, **_rng(1))
    cfg_scale: float = 4.0
    guidance_interval: typing.Optional[typing.List[float]] = _f(None, **_rng(0.0, 1.0), length=2)
    num_images: int = _f(64, **_rng(1))
    nrow: int = _f(8, **_rng(1))
    classes: typing.Optional[typing.List[int]] = _f(None, **_rng(0))
    prompts: typing.Optional[typing.List[str]] = None  # text models: the pictures' prompts
    map_time: float = _f(0.5, **_rng(0.0, 1.0))


@dataclass
class DataConfig:
    name: str = _f("digits", choices=_data_names)
    path: typing.Optional[str] = None
    labels_path: typing.Optional[str] = None
    split: str = _f("train", **_choices("train", "test"))
    image_size: typing.Optional[int] = _f(16, **_rng(1))  # null: from the data (a latent set's manifest)
    channels: typing.Optional[int] = _f(1, **_rng(1))
    num_classes: typing.Optional[int] = _f(None, **_rng(1))
    scale_factor: typing.Optional[float] = _f(1.0, **_rng(0.0, lo_open=True))
    val_size: int = _f(0, **_rng(0))
    num_workers: int = _f(0, **_rng(0))
    # data=latents only (keys the other options do not have)
    flip: bool = _f(True, may_be_absent=True)
    sample_posterior: bool = _f(False, may_be_absent=True)
    # data=caption_shards only
    shuffle: int = _f(1000, may_be_absent=True, **_rng(0))
    # data=custom only: the factory (package.module:callable) and its keyword arguments
    target: typing.Optional[str] = _f(None, may_be_absent=True)
    params: dict = field(default_factory=dict, metadata={"may_be_absent": True})


def _text_encoder_names():
    return ENCODER_NAMES


@dataclass
class TextConfig:
    name: str = _f("minilm", choices=_text_encoder_names)
    path: typing.Optional[str] = None
    tokenizer_path: typing.Optional[str] = None
    max_length: typing.Optional[int] = _f(None, **_rng(1))
    dropout: float = _f(0.1, **_rng(0.0, 1.0, hi_open=True))
    cache: bool = True
    cache_dir: typing.Optional[str] = None


@dataclass
class TrainConfig:
    # data first: the model's sizes interpolate data's keys, so a bad value is named where it was set
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    text: TextConfig = field(default_factory=TextConfig)
    seed: int = _f(0, **_rng(0))
    device: str = _f("auto", **_choices("auto", "cpu", "cuda"))
    resume: typing.Optional[str] = None
    init_from: typing.Optional[str] = None  # a new run from these weights (pf.training.warm_start)
    init_from_ema: bool = True
    overwrite: bool = False  # a run already in the folder moves to previous-<time>/ (pf.training.run_folder)


#################################################################################
#                                   Checking                                    #
#################################################################################

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _is(value, tp) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is dict:
        return isinstance(value, dict)
    return True


def _range_text(meta: dict) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        return f" in {'(' if meta['lo_open'] else '['}{lo}, {hi}{')' if meta['hi_open'] else ']'}"
    if lo is not None:
        return f" {'>' if meta['lo_open'] else '>='} {lo}"
    if hi is not None:
        return f" {'<' if meta['hi_open'] else '<='} {hi}"
    return ""


def _in_range(value, meta: dict) -> bool:
    lo, hi = meta.get("lo"), meta.get("hi")
    if value != value:  # NaN
        return False
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        return False
    return not (hi is not None and (value >= hi if meta.get("hi_open") else value > hi))


def _check_leaf(key: str, value, tp, meta: dict) -> None:
    meta = {k: v for k, v in meta.items() if k != "may_be_absent"}
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    if optional:
        if value is None:
            return
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    origin = typing.get_origin(tp)
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    null = " or null" if optional else ""
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        want = f"a list of {_TYPE_WORDS[item].split(' ', 1)[1]}s{_range_text(meta)}" + (
            f" of length {meta['length']}" if meta.get("length") else "") + null
        if not isinstance(value, (list, tuple)) or not all(_is(v, item) and _in_range(v, meta) for v in value) or (
                meta.get("length") and len(value) != meta["length"]):
            raise ConfigError(f"{key}={value!r}: expected {want}")
        return
    if not _is(value, tp):
        raise ConfigError(f"{key}={value!r}: expected {_TYPE_WORDS.get(tp, tp.__name__)}{_range_text(meta)}{null}"
                          + (f" (one of {', '.join(map(str, choices))})" if choices else ""))
    if choices and value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, choices))}")
    if tp in (int, float) and not _in_range(value, meta):
        raise ConfigError(f"{key}={value!r}: expected {_TYPE_WORDS[tp]}{_range_text(meta)}")


def _check(node: dict, schema, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node:
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key} ({prefix.rstrip('.') or 'the config'} takes: "
                              f"{', '.join(fields)})")
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in node:
            if f.metadata.get("may_be_absent"):
                continue
            raise ConfigError(f"config key {key} is missing")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(node[name], dict):
                raise ConfigError(f"{key}={node[name]!r}: expected a group of keys ({', '.join(x.name for x in dataclasses.fields(tp))})")
            _check(node[name], tp, f"{key}.")
        else:
            _check_leaf(key, node[name], tp, dict(f.metadata))


def check_config(cfg) -> None:
    """Stop with one :class:`ConfigError` line unless ``cfg`` (a DictConfig or dict) fits the schema."""
    node = {k: v for k, v in (OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig)
                              else dict(cfg)).items() if k != "hydra"}
    _check(node, TrainConfig, "")
    _check_family(node)
    parse_log_targets(node["trainer"]["log"])
    tr = node["trainer"]
    if tr["batch_size"] % tr["grad_accum"]:
        raise ConfigError(f"trainer.batch_size={tr['batch_size']} does not split into trainer.grad_accum="
                          f"{tr['grad_accum']} equal micro-batches")
    if tr["min_lr"] > tr["lr"]:
        raise ConfigError(f"trainer.min_lr={tr['min_lr']} is above trainer.lr={tr['lr']}: the schedule decays to min_lr")
    if tr["strategy"] == "fsdp" and tr["precision"] == "fp16":
        raise ConfigError("trainer.strategy=fsdp with trainer.precision=fp16: loss scaling would check one shard per "
                          "rank; use precision=bf16 (or fp32) with fsdp")
    sc = node["sampler"]
    try:
        samplers.make(sc["name"], **sc["params"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sampler.params={sc['params']!r} for sampler {sc['name']}: {err}") from None
    ts = {k: v for k, v in node["trainer"]["timesteps"].items() if k != "name" and v is not None}
    try:
        timesteps.make(node["trainer"]["timesteps"]["name"], **ts)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"trainer.timesteps={node['trainer']['timesteps']!r}: {err}") from None


LOG_TARGETS = ("jsonl", "tensorboard", "wandb")


def parse_log_targets(value) -> list[str]:
    """``trainer.log``: ``"jsonl,tensorboard"`` (or a list) -> ``["jsonl", "tensorboard"]``, jsonl always first."""
    if not isinstance(value, (str, collections.abc.Sequence)):  # a ListConfig is a Sequence
        raise ConfigError(f"trainer.log={value!r}: expected target names (jsonl, tensorboard, wandb) as a string "
                          "or a list")
    names = [str(v).strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    bad = [n for n in names if n not in LOG_TARGETS]
    if bad:
        raise ConfigError(f"trainer.log={value!r}: unknown target {bad[0]!r}; expected names from "
                          f"{', '.join(LOG_TARGETS)}, comma-separated")
    return ["jsonl", *dict.fromkeys(n for n in names if n != "jsonl")]


# SPEC section 11: the text-to-image model trains with LTG at loc 0.5 (the class model keeps LTG's 0.7).
FAMILY_LTG_LOC = {"t2i": 0.5}


def fill_family_defaults(cfg):
    """``cfg`` with its model family's LTG ``loc`` where ``trainer.timesteps.loc`` is null (so the
    run's saved config says what it trained with); any other config is returned as it is."""
    ts = cfg.trainer.timesteps
    loc = FAMILY_LTG_LOC.get(cfg.model.get("family", "dit"))
    if ts.name != "ltg" or loc is None or ts.get("loc") is not None:
        return cfg
    return OmegaConf.merge(cfg, {"trainer": {"timesteps": {"loc": loc}}})


def _check_family(node: dict) -> None:
    """A text model is a T2I preset trained as Patch Forcing (per-patch times), without REPA."""
    model = node["model"]
    if (model["family"] == "t2i") != model["name"].startswith("PFT2I-"):
        t2i = ", ".join(f"PFT2I-{k}" for k in T2I_PRESET_SIZES)
        raise ConfigError(f"model.name={model['name']!r} with model.family={model['family']!r}: text models are "
                          f"{t2i} (family t2i), the others family dit")
    if model["family"] == "t2i" and (node["trainer"]["kind"] != "pf" or node["trainer"]["repa"]["enabled"]):
        raise ConfigError("model=t2i-* is a Patch Forcing model: it needs trainer=pf (per-patch times) and "
                          "trainer.repa.enabled=false")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _unknown_part(path: list[str]) -> tuple[str, list[str]] | None:
    """None if ``path`` names a key of the schema, else (the group reached, the keys it takes)."""
    schema, where = TrainConfig, "the config"
    for i, part in enumerate(path):
        fields = [f.name for f in dataclasses.fields(schema)]
        if part not in fields:
            return where, fields
        tp = typing.get_type_hints(schema)[part]
        if tp is dict:
            return None  # free keys below (sampler.params)
        if not dataclasses.is_dataclass(tp):
            return None if i == len(path) - 1 else (".".join(path[:i + 1]), [])
        schema, where = tp, ".".join(path[:i + 1])
    return None


def check_overrides(argv: list[str]) -> None:
    """Command-line overrides name existing group options and keys (checked before hydra composes)."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key.startswith("hydra"):  # hydra.run.dir=..., hydra/launcher=...: hydra's own
            continue
        if key in GROUPS:
            if value not in group_options(key):
                raise ConfigError(f"{key}={value}: unknown option; choose one of {', '.join(group_options(key))}")
            continue
        bad = _unknown_part(key.split("."))
        if bad is not None:
            where, known = bad
            raise ConfigError(f"unknown config key {key}" + (f" ({where} takes: {', '.join(known)})" if known else
                                                               f" ({where} is not a group of keys)"))


def compose_config(overrides: list[str], *, with_hydra: bool = False) -> DictConfig:
    """``pf.train``'s config for ``overrides``: keys checked first (:func:`check_overrides`), then
    hydra's compose, whose own parse and compose errors become one :class:`ConfigError` line."""
    check_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=with_hydra)
    except HydraException as err:
        text = " ".join(str(err).split()) or type(err).__name__
        override = getattr(err, "override", None)
        raise ConfigError(f"{override}: {text}" if override else text) from err
