"""Checkpoints: the released PFT file format and this project's own, loaded safely.

Released file (SPEC.md section 2)::

    {"state_dict": {...}, "config": {"target": "patch_flow.models.pf_transformer.PatchForcingDiT",
                                     "params": {in_channels, input_size, depth, ...}}}

(REPA: target ``patch_flow.models.pf_transformer_repa.REPAPatchForcingDiT``, params with
``z_dim``, ``encoder_depth`` and ``projector_dim``, and the ``projector.*`` weights.)

``config`` may be a plain dict or an OmegaConf ``DictConfig``. This project's own files::

    {"format": "patch-forcing", "model_class": "PatchForcingDiT" | "GlobalTimeDiT" | "PatchForcingT2I" | ...,
     "config": {...constructor args...}, "state_dict": {...}, "ema": {...} (optional), ...}

Everything is read with ``torch.load(weights_only=True)``: no pickled code runs; only the
OmegaConf container classes are allow-listed, so a released config can be read.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import tempfile
import typing
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, nodes
from omegaconf.base import Container, ContainerMetadata, Metadata, Node
from safetensors import safe_open
from safetensors.torch import save_file

from pf.models.dit import GlobalTimeDiT, PatchForcingDiT
from pf.models.repa import REPAGlobalTimeDiT, REPAPatchForcingDiT
from pf.models.t2i import PatchForcingT2I

FORMAT = "patch-forcing"
MODEL_CLASSES = {"PatchForcingDiT": PatchForcingDiT, "GlobalTimeDiT": GlobalTimeDiT,
                 "REPAPatchForcingDiT": REPAPatchForcingDiT, "REPAGlobalTimeDiT": REPAGlobalTimeDiT,
                 "PatchForcingT2I": PatchForcingT2I}
# ``config.target`` written into released-format files (the published code's class paths
# for the PF models; the baselines have no published file, so they name ours).
RELEASED_TARGETS = {"PatchForcingDiT": "patch_flow.models.pf_transformer.PatchForcingDiT",
                    "REPAPatchForcingDiT": "patch_flow.models.pf_transformer_repa.REPAPatchForcingDiT",
                    "GlobalTimeDiT": "pf.models.GlobalTimeDiT", "REPAGlobalTimeDiT": "pf.models.REPAGlobalTimeDiT",
                    "PatchForcingT2I": "pf.models.PatchForcingT2I"}


def _omegaconf_safe_globals() -> list:
    """The classes a pickled OmegaConf DictConfig refers to, and nothing else."""
    allowed = [DictConfig, ListConfig, ContainerMetadata, Metadata, Container, Node, typing.Any, dict, list, int, collections.defaultdict]
    allowed += [getattr(nodes, name) for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode", "EnumNode", "ValueNode")
                if hasattr(nodes, name)]
    return allowed


def read_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """``torch.load`` with ``weights_only=True`` and a clear error for what is not a checkpoint.
    ``mmap``: map the tensors instead of reading them (a look at the config costs no memory).

    A ``.safetensors`` file (written by ``python -m pf.export``) is read with safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, map_location)
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes), not a checkpoint")
    try:
        with torch.serialization.safe_globals(_omegaconf_safe_globals()):
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap or None)
    except Exception as err:  # pickle errors, zip errors, disallowed globals
        raise ValueError(f"{path} is not a readable checkpoint (read without running pickled code): "
                         f"{_load_reason(err)}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a checkpoint: expected a dict, got {type(obj).__name__}")
    return obj


# torch's weights-only refusal wraps its reason in advice to load with weights_only=False,
# which would run whatever the file holds: never repeated to the user.
_ADVICE = ("weights only load failed", "weights_only", "please file an issue", "check the documentation",
           "arbitrary code execution", "trusted source")


def _load_reason(err: Exception) -> str:
    """The reason ``torch.load`` gave, without its advice (one line, never empty)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    kept = [ln.removeprefix("WeightsUnpickler error:").strip() for ln in lines
            if not any(a in ln.lower() for a in _ADVICE)]
    reason = "; ".join(k for k in kept if k)
    return reason or f"{type(err).__name__} while reading it"


def _to_plain(config: Any) -> dict:
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return dict(config)


def model_from_checkpoint_dict(ckpt: dict, *, use_ema: bool = True, strict: bool = True, source: str = "checkpoint"):
    """Build the model a checkpoint dict describes and load its weights."""
    if "config" not in ckpt or not any(k in ckpt for k in ("state_dict", "ema")):
        raise ValueError(
            f"{source} is not a Patch Forcing checkpoint: expected keys 'state_dict' and 'config', "
            f"found {sorted(ckpt)}"
        )
    config = _to_plain(ckpt["config"])
    if ckpt.get("format") == FORMAT:
        cls_name, params = ckpt.get("model_class", "PatchForcingDiT"), config
    else:  # released file: {"target": "...PatchForcingDiT", "params": {...}}
        if "params" not in config:
            raise ValueError(f"{source}: config has no 'params' (keys: {sorted(config)})")
        cls_name, params = str(config.get("target", "PatchForcingDiT")).rsplit(".", 1)[-1], _to_plain(config["params"])
    if cls_name not in MODEL_CLASSES:
        raise ValueError(f"{source}: unknown model class {cls_name!r}; known: {sorted(MODEL_CLASSES)}")
    try:
        model = MODEL_CLASSES[cls_name](**params)
    except TypeError as err:  # a parameter this version's class does not take
        raise ValueError(f"{source}: its config does not fit {cls_name} ({err})") from err
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt.get("state_dict", ckpt.get("ema"))
    load_state_dict_checked(model, state, strict=strict, source=source)
    return model


def unwrapped_keys(state: dict) -> dict:
    """``state`` with the prefixes of a ``torch.compile`` (``_orig_mod.``) and a DDP (``module.``) wrapper removed."""
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}


def load_state_dict_checked(model: torch.nn.Module, state: dict, *, strict: bool = True, source: str = "checkpoint") -> None:
    """``load_state_dict`` whose error names the missing and unexpected keys."""
    state = unwrapped_keys(state)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if strict and (missing or unexpected):
        raise ValueError(f"{source} does not match the model: missing keys {missing}, unexpected keys {unexpected}")
    model.load_state_dict(state, strict=strict)


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu", use_ema: bool = True, strict: bool = True):
    """Load a released PFT checkpoint or one of this project's files into a model (eval mode).

    ``use_ema`` picks the EMA weights of a training checkpoint when it has them.
    """
    ckpt = read_checkpoint_file(path, map_location=map_location)
    model = model_from_checkpoint_dict(ckpt, use_ema=use_ema, strict=strict, source=str(path))
    return model.eval()


def write_atomically(path: str | os.PathLike, write) -> None:
    """``write(tmp_path)`` into a temp file in ``path``'s folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the old file or the new one, never half of one, and no
    temp file is left behind by an error.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # name the file the user asked for, not the temp file
        raise OSError(err.errno, err.strerror, str(path)) from err
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, Exception) and _disk_full(tmp, err)
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:  # torch.save and np.save report a full disk without errno or file name
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (nothing written)", str(path)) from err
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def _disk_full(tmp: str, err: Exception) -> bool:
    """Whether a failed write ran out of space: the error says so, or a probe write of 64 KiB
    into the temp file fails with ENOSPC (called only after a write failed)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        with open(tmp, "ab") as f:
            f.write(bytes(1 << 16))
            f.flush()
            os.fsync(f.fileno())
    except OSError as probe:
        return probe.errno in (errno.ENOSPC, errno.EDQUOT)
    return False


def check_writable(folder: str | os.PathLike, create: bool = True) -> Path:
    """Prove a file can be made in ``folder`` (a read-only mount refuses even root), before a
    command spends time on work it could not save. ``create``: make the folder now; otherwise
    its nearest existing parent is probed and nothing is created."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder (a file is in the way)", str(folder))
    probe_in = folder
    if not create:
        while not probe_in.exists() and probe_in != probe_in.parent:
            probe_in = probe_in.parent
        if not probe_in.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder (a file is in the way)", str(probe_in))
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=probe_in)
    except OSError as err:
        raise OSError(err.errno, f"cannot write here ({err.strerror})", str(folder)) from err
    os.close(fd)
    os.remove(probe)
    return folder


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` written atomically (:func:`write_atomically`)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    write_atomically(path, write)


def model_checkpoint(model: PatchForcingDiT, ema_state: dict | None = None, **extra) -> dict:
    """This project's checkpoint dict for ``model`` (plus training state in ``extra``)."""
    ckpt = {
        "format": FORMAT,
        "model_class": type(model).__name__,
        "config": model.config(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if ema_state is not None:
        ckpt["ema"] = {k: v.detach().cpu() for k, v in ema_state.items()}
    ckpt.update(extra)
    return ckpt


def save_safetensors(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Weights as safetensors with ``{"format", "model_class", "config"}`` as JSON metadata."""
    path = Path(path)
    meta = {"format": FORMAT, "model_class": type(model).__name__, "config": json.dumps(model.config())}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(state, tmp, metadata=meta))


def _read_safetensors(path: Path, map_location: Any) -> dict:
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {err}") from err
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path} has no Patch Forcing metadata (format/model_class/config); keys: {sorted(meta)}")
    return {"format": FORMAT, "model_class": meta.get("model_class", "PatchForcingDiT"),
            "config": json.loads(meta["config"]), "state_dict": state}
