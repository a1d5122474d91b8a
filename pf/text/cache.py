"""Embeddings of a fixed caption set, computed once: training on a CPU never runs the text
encoder again.

``CachedTextEncoder(encoder, captions)`` encodes every distinct caption (and ``""``, the null
prompt of guidance) in batches, keeps each caption's real tokens (its padding dropped) in one
flat ``(T, C)`` table, and answers ``cached(prompts)`` by lookup: rows padded on the right to
the longest prompt of the batch, mask False and tokens zero on the padding, as the encoder
itself gives them. A prompt outside the set goes to the encoder (counted in ``misses``).

With ``path`` the table is saved to / loaded from a ``.pt`` file (``torch.load(weights_only=True)``):
a folder gets ``<encoder name>-<key>.pt``; a file is reused only when its stored key (a hash of
the encoder's identity, its length limit, the sorted distinct captions and the table's dtype) matches, and is
otherwise rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pf.conditioning import TextCond
from pf.models.checkpoint import write_atomically
from pf.text.encoders import check_prompts

FORMAT = "pf-text-cache"


def cache_key(encoder, captions: list[str], dtype: torch.dtype = torch.float32) -> str:
    """sha256 of what the table depends on: the encoder's identity, the distinct captions and the
    dtype the table is stored in."""
    what = [FORMAT, str(getattr(encoder, "identity", encoder.name)), int(encoder.max_length), int(encoder.dim),
            sorted(set(captions)), str(dtype)]
    return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()


class CachedTextEncoder(nn.Module):
    """A text encoder answered from a table of a fixed caption set (see the module docstring).

    ``dtype``: how the table is stored (float32: exactly the encoder's tokens; float16 halves
    memory); lookups come back float32 on the encoder's device.
    """

    def __init__(self, encoder: nn.Module, captions, *, path: str | Path | None = None, batch_size: int = 256,
                 dtype: torch.dtype = torch.float32, progress: bool | None = None):
        super().__init__()
        self.encoder = encoder
        self.name, self.dim, self.max_length = encoder.name, int(encoder.dim), int(encoder.max_length)
        distinct = sorted(set(check_prompts(list(captions) + [""])))
        self.key = cache_key(encoder, distinct, dtype)
        self.file = _cache_file(path, self.name, self.key) if path is not None else None
        stored = self._load() if self.file is not None else None
        if stored is None:
            stored = self._encode_all(distinct, int(batch_size), dtype, progress)
            if self.file is not None:
                self._save(stored)
        self.captions: list[str] = stored["captions"]
        self.index = {c: i for i, c in enumerate(self.captions)}
        self.table: torch.Tensor = stored["tokens"]     # (T, C): every caption's real tokens, one after another
        self.offsets: torch.Tensor = stored["offsets"]  # (N + 1,) int64: caption i is table[offsets[i]:offsets[i + 1]]
        self._starts = self.offsets.tolist()
        self.hits = self.misses = 0

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def train(self, mode: bool = True) -> CachedTextEncoder:
        return super().train(False)

    # ------------------------------------------------------------------ building the table
    @torch.no_grad()
    def _encode_all(self, captions: list[str], batch_size: int, dtype: torch.dtype, progress) -> dict:
        order = sorted(range(len(captions)), key=lambda i: len(captions[i]))  # similar lengths share a batch
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        show = len(batches) >= 4 if progress is None else bool(progress)
        rows: list[torch.Tensor | None] = [None] * len(captions)
        for batch in tqdm(batches, desc=f"encoding {len(captions)} captions with {self.name}", disable=not show):
            cond = self.encoder([captions[i] for i in batch])
            tokens, mask = cond.tokens.cpu(), cond.mask.cpu()
            for j, i in enumerate(batch):
                rows[i] = tokens[j][mask[j]].to(dtype)  # (L_i, C): the real tokens only
        lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        return {"format": FORMAT, "key": self.key, "name": self.name, "captions": captions,
                "tokens": torch.cat(rows).contiguous(), "offsets": offsets}

    def _load(self) -> dict | None:
        if not self.file.is_file():
            return None
        try:
            stored = torch.load(self.file, map_location="cpu", weights_only=True)
        except Exception as err:
            warnings.warn(f"text cache {self.file} is unreadable ({type(err).__name__}); encoding again", stacklevel=3)
            return None
        if not isinstance(stored, dict) or stored.get("format") != FORMAT or stored.get("key") != self.key:
            warnings.warn(f"text cache {self.file} was made for another encoder or caption set; encoding again",
                          stacklevel=3)
            return None
        return stored

    def _save(self, stored: dict) -> None:
        # atomic: ranks writing the same table never leave half a file (each its own temp file)
        write_atomically(self.file, lambda tmp: torch.save(stored, tmp))

    # ------------------------------------------------------------------ lookup
    def rows_of(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's real tokens (L_i, C) on the CPU: from the table, or encoded when unseen."""
        prompts = check_prompts(prompts)
        found = [self.index.get(p) for p in prompts]
        rows: list[torch.Tensor | None] = [None] * len(prompts)
        for b, i in enumerate(found):
            if i is not None:
                rows[b] = self.table[self._starts[i]:self._starts[i + 1]]
        unseen = [b for b, i in enumerate(found) if i is None]
        if unseen:
            cond = self.encoder([prompts[b] for b in unseen])
            tokens, mask = cond.tokens.cpu(), cond.mask.cpu()
            for j, b in enumerate(unseen):
                rows[b] = tokens[j][mask[j]]
        self.hits += len(prompts) - len(unseen)
        self.misses += len(unseen)
        return rows

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextCond:
        rows = self.rows_of(prompts)
        length = max(r.shape[0] for r in rows)
        tokens = torch.zeros(len(rows), length, self.dim)               # (B, L, C)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)         # (B, L)
        for b, r in enumerate(rows):
            tokens[b, :r.shape[0]] = r.float()
            mask[b, :r.shape[0]] = True
        device = self.device
        return TextCond(tokens.to(device), mask.to(device))

    def extra_repr(self) -> str:
        return f"captions={len(self.captions)}, tokens={self.table.shape[0]}, file={self.file}"


def _cache_file(path, name: str, key: str) -> Path:
    path = Path(path).expanduser()
    if path.suffix == ".pt":
        return path
    return path / f"{name}-{key[:16]}.pt"


__all__ = ["CachedTextEncoder", "cache_key"]
