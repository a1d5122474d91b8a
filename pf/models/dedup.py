"""Deduplicated per-token conditioning, shared by every per-patch-time model.

At sampling time the patches of a sample share only a few distinct times (one for EulerPF,
two for dual-loop and look-ahead). A model whose conditioning is a function of the time
alone (the DiT's timestep embedding and AdaLN modulations, the T2I model's time mapping
network and AdaRMSNorm scales) then computes it once per distinct time, as a (B, K, *)
table read per token through a (B, N) row index: exact, and the (B, N, *) tensors never
exist. Finding the distinct times needs no host sync (sort, mark changes, cumsum); only the
table width K is a host number:

  eager    K = the largest distinct count over the batch, read with ONE sync per forward;
           the table is used when K <= dedup_max_distinct and K * dedup_min_tokens_per_time <= N;
  K = 1    needs no index: the (B, 1, *) conditioning broadcasts over the tokens;
  static   inside ``model.sync_free(distinct_times=K)`` the caller gives K (a sampler's
           ``max_distinct_times``) and nothing syncs: CUDA-graph capture and torch.compile.
Training keeps the plain per-token path: there every patch has its own time.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch


class TimeTable(NamedTuple):
    times: torch.Tensor  # (B, K) the distinct times of each sample, padded with its largest
    index: torch.Tensor  # (B, N) int64: row of ``times`` holding each token's time


def time_ranks(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank of every distinct value per row, without host sync.

    t (B, N) -> (sorted t (B, N), order (B, N), rank of each sorted entry (B, N)); the
    rank counts the distinct values before it, so ``rank[:, -1] + 1`` is each row's K.
    """
    ts, order = t.sort(dim=1)  # (B, N)
    changed = (ts[:, 1:] != ts[:, :-1]).to(torch.int64)  # (B, N-1) 1 where a new value starts
    rank = torch.cat([torch.zeros_like(changed[:, :1]), changed.cumsum(1)], dim=1)  # (B, N)
    return ts, order, rank


def time_table(t: torch.Tensor, k: int, ranks=None) -> TimeTable:
    """The (B, k) table of distinct times of t (B, N) and each token's row, no host sync.

    Rows with fewer than k distinct times repeat their largest one (harmless extra rows);
    rows with more than k would map the extra times onto row k-1 (wrong: callers ensure k).
    """
    ts, order, rank = ranks if ranks is not None else time_ranks(t)
    rank = rank.clamp_max(k - 1)  # (B, N)
    times = ts[:, -1:].repeat(1, k)  # (B, k) new memory; padding: the row's largest time
    times.scatter_(1, rank, ts)  # equal values land on the same row: order does not matter
    index = torch.empty_like(rank).scatter_(1, order, rank)  # (B, N) back to token order
    return TimeTable(times, index)


def check_image(x: torch.Tensor, in_channels: int, patch_size: int) -> tuple[int, int]:
    """(B, N) of a (B, C, H, W) model input, or one line naming what is wrong."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if c != in_channels:
        raise ValueError(f"x has {c} channels, the model expects {in_channels}")
    if h % patch_size or w % patch_size:
        raise ValueError(f"H, W = {h}, {w} must be divisible by the patch size {patch_size}")
    return b, (h // patch_size) * (w // patch_size)


def capturing(ref: torch.Tensor) -> bool:
    """True inside a CUDA-graph capture (no host reads allowed)."""
    return ref.is_cuda and torch.cuda.is_current_stream_capturing()


class DistinctTimes:
    """Mixin for ``nn.Module`` models with per-patch times: ``sync_free`` and ``time_table``.

    Class attributes: use the table when a sample has at most ``dedup_max_distinct`` distinct
    times and ``N >= K * dedup_min_tokens_per_time`` (``dedup_max_distinct = 0``: never).
    """

    dedup_max_distinct = 8
    dedup_min_tokens_per_time = 4
    _sync_free = False  # inside ``sync_free()``: no host reads in forward
    _static_distinct: int | None = None  # the time-table width given by ``sync_free()``

    @contextlib.contextmanager
    def sync_free(self, distinct_times: int | None = None):
        """Within this context ``forward`` reads no tensor value on the host.

        ``distinct_times=K``: every sample's patch times take at most K distinct values
        (the caller's promise, e.g. a sampler's ``max_distinct_times``), so the conditioning
        is computed once per time with a static table width. ``None``: the plain per-token
        path. The input range checks (host reads) are skipped. Use it for CUDA-graph capture
        and ``torch.compile``; nests, restoring the previous state on exit.
        """
        if distinct_times is not None and int(distinct_times) < 1:
            raise ValueError(f"distinct_times must be a positive int or None, got {distinct_times}")
        saved = self._sync_free, self._static_distinct
        self._sync_free = True
        self._static_distinct = None if distinct_times is None else int(distinct_times)
        try:
            yield self
        finally:
            self._sync_free, self._static_distinct = saved

    def may_read_host(self, ref: torch.Tensor) -> bool:
        """Whether an input check may read a value on the host now (not in sync_free, compile or capture)."""
        return not self._sync_free and not torch.compiler.is_compiling() and not capturing(ref)

    def time_table(self, t: torch.Tensor) -> TimeTable | None:
        """The deduplicated (B, K) time table for per-patch ``t`` (B, N), or None for the plain path."""
        if t.dim() != 2:
            return None  # (B,) times already give a (B, 1, *) conditioning
        if self._static_distinct is not None:
            return time_table(t, self._static_distinct)
        n = t.shape[1]
        if (
            self.training
            or self._sync_free
            or self.dedup_max_distinct < 1
            or n < self.dedup_min_tokens_per_time
            or torch.compiler.is_compiling()
            or capturing(t)
        ):
            return None
        ranks = time_ranks(t)
        k = int(ranks[2][:, -1].max()) + 1  # the one host sync of a forward
        if k > self.dedup_max_distinct or k * self.dedup_min_tokens_per_time > n:
            return None
        return time_table(t, k, ranks)

    def conditioning_times(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The times to compute the conditioning at, and the (B, N) index when they are a table.

        (B,) -> (B, 1) and no index (broadcast); (B, N) with one distinct time per sample ->
        (B, 1), no index; with a few -> the (B, K) table and its index; else (B, N), no index.
        """
        if t.dim() == 1:
            return t[:, None], None
        table = self.time_table(t)
        if table is None:
            return t, None
        if table.times.shape[1] == 1:
            return table.times, None
        return table.times, table.index
