"""The exact mapping of MHA2MLA attention onto vLLM's MLA tensor layout.

MHA2MLA caches, per token, a latent ``c`` (``C = g·d_kv`` dims) and the rotated rope keys of
every kv-head (``R = g·rope_dim`` dims). vLLM's MLA caches ``[latent (kv_lora_rank) | k_pe
(qk_rope_head_dim)]`` and scores ``q_nope·(W_UK c) + q_pe·k_pe`` per head. The mapping:

- the rope slot ``k_pe`` holds the first ``min(R, slot)`` rotated key dims (flattened over
  kv-heads); the rest ride in the latent after ``c``; zeros pad both;
- a query head's ``q_pe`` holds its own rotated dims at its kv-head's slot positions, zeros
  elsewhere; its ``q_nope`` is ``[nope dims | rotated dims whose keys are in the latent | 0]``;
- ``kv_b_proj`` key rows of a head are ``[W_up_k rows | identity onto its latent-resident
  rotated keys | 0]``, value rows ``[W_up_v rows | 0]`` (vLLM absorbs these into the query
  and the output).

Rotation happens before caching, so identity rows on rotated keys are exact. Everything here
is pure index arithmetic shared by the converter, the reference model and the vLLM plugin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import cached_property

import torch

from conversion.errors import ConversionError

NATIVE_HEAD_SIZES = (576, 512, 320)
"""Head sizes (kv_lora_rank + qk_rope_head_dim) vLLM's MLA kernels accept (CPU: 576 only).
The one place these sizes are spelled; everything else derives from this tuple."""
DEFAULT_NATIVE_HEAD_SIZE = NATIVE_HEAD_SIZES[0]
"""576 is the one size every vLLM MLA backend serves (FlashMLA, Triton, CPU)."""
CPU_NATIVE_HEAD_SIZES = (DEFAULT_NATIVE_HEAD_SIZE,)
"""The head sizes vLLM's CPU MLA backends accept."""
NATIVE_ROPE_SLOT = 64
SERIALISED_LATENT_WIDTH = "latent_dim"
"""The key :attr:`MLALayout.latent_width` has in a checkpoint's config.json and report."""
NATIVE_PREFILL_DIMS = ((64, 64, 128), (128, 64, 128), (192, 64, 256))
"""(qk_nope_head_dim, qk_rope_head_dim, v_head_dim) triples vLLM's MLA prefill accepts."""


@dataclass(frozen=True)
class MLALayout:
    """Dimensions of one converted model's attention, MHA2MLA side and vLLM side."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_dim: int
    d_kv: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    latent_width: int = 0
    """C, the latent width: the SVD latent shared by keys and values (all kv-heads). 0 (the
    default, and what checkpoints written before per-layer widths hold) means
    ``num_kv_heads · d_kv``; a per-layer allocation gives each layer its own
    (:meth:`with_latent`), ``d_kv`` then being the budget's average per kv-head. At most
    ``kv_lora_rank``, vLLM's latent part of the cache row, which also holds rotary keys that do
    not fit the rope slot and zero padding. Serialised as ``latent_dim`` (:meth:`to_dict`)."""

    def __post_init__(self) -> None:
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.latent_width == 0:
            object.__setattr__(self, "latent_width", g * self.d_kv)
        if self.latent_width < 1:
            raise ConversionError(f"latent width {self.latent_width} must be at least 1")
        if h % g:
            raise ConversionError(f"{h} query heads do not split into {g} kv-head groups")
        if self.latent_width + self.rope_overflow > self.kv_lora_rank:
            raise ConversionError(
                f"latent {self.latent_width} + rotary overflow {self.rope_overflow} does not fit "
                f"kv_lora_rank {self.kv_lora_rank}"
            )
        worst_overflow = max(self._overflow_count(k) for k in range(g))
        if d - self.rope_dim + worst_overflow > self.qk_nope_head_dim:
            raise ConversionError(
                f"qk_nope_head_dim {self.qk_nope_head_dim} cannot hold {d - self.rope_dim} nope "
                f"dims plus {worst_overflow} latent-resident rotary dims"
            )
        if d > self.v_head_dim:
            raise ConversionError(f"v_head_dim {self.v_head_dim} < head_dim {d}")

    def with_latent(self, latent_width: int) -> "MLALayout":
        """This layout with a latent of ``latent_width`` (one layer of a per-layer allocation);
        an exact layout's ``kv_lora_rank`` follows the latent, a native one keeps its row."""
        exact = self.kv_lora_rank == self.latent_width + self.rope_overflow
        rank = latent_width + self.rope_overflow if exact else self.kv_lora_rank
        return replace(self, latent_width=latent_width, kv_lora_rank=rank)

    def with_rope(self, rope_dim: int) -> "MLALayout":
        """This exact layout with ``rope_dim`` rotary dims per head (one layer of a per-layer
        allocation that also spends rotary dims per layer): the rope slot holds every kv-head's
        rotated keys and the nope part the rest of each head, so only those sizes change."""
        if self.kv_lora_rank != self.latent_width or self.rope_overflow:
            raise ConversionError("per-layer rotary dims need the exact layout (kv_lora_rank = latent width)")
        if rope_dim % 2 or not 2 <= rope_dim <= self.head_dim:
            raise ConversionError(f"rotary dims {rope_dim} must be even and in [2, {self.head_dim}]")
        return replace(self, rope_dim=rope_dim, qk_rope_head_dim=self.num_kv_heads * rope_dim,
                       qk_nope_head_dim=self.head_dim - rope_dim)

    def for_layer(self, latent_width: int | None = None, rope_dim: int | None = None) -> "MLALayout":
        """One layer's layout under a per-layer allocation: its own latent width and rotary dims
        where given (None: this layout's), for the converter's plan and a checkpoint's spec alike."""
        lay = self if latent_width is None else self.with_latent(latent_width)
        return lay if rope_dim is None or rope_dim == lay.rope_dim else lay.with_rope(rope_dim)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def rope_total(self) -> int:
        """R: rotated key dims cached per token (all kv-heads)."""
        return self.num_kv_heads * self.rope_dim

    @property
    def rope_in_slot(self) -> int:
        return min(self.rope_total, self.qk_rope_head_dim)

    @property
    def rope_overflow(self) -> int:
        return self.rope_total - self.rope_in_slot

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def nope_columns_used(self) -> int:
        """Leading ``q_nope`` columns some query head can be non-zero on: its nope dims and the
        rotated dims whose keys ride in the latent; the columns after them are zero padding in
        every head (the native layouts' ``qk_nope_head_dim`` rounds up to a kernel size)."""
        return self.nope_dim + max(self._overflow_count(k) for k in range(self.num_kv_heads))

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def cache_values(self) -> int:
        """Values vLLM stores per token per layer (head size of its MLA cache)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def essential_values(self) -> int:
        """Values MHA2MLA needs per token per layer (C + R); the rest is zero padding."""
        return self.latent_width + self.rope_total

    @property
    def compact_q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def compact_kv_dim(self) -> int:
        return self.latent_width + self.rope_total

    @property
    def is_native(self) -> bool:
        """True if stock vLLM MLA kernels accept this shape (GPU; CPU needs 576)."""
        dims = (self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim)
        return self.cache_values in NATIVE_HEAD_SIZES and dims in NATIVE_PREFILL_DIMS

    def _overflow_count(self, kv_head: int) -> int:
        first = kv_head * self.rope_dim
        return sum(1 for f in range(first, first + self.rope_dim) if f >= self.qk_rope_head_dim)

    # -- index maps --------------------------------------------------------------------------
    @cached_property
    def q_gather_index(self) -> torch.Tensor:
        """``[h·(qk_nope+qk_rope)]`` indices into the compact query ``[h·d]`` plus one zero.

        The compact query of head j is ``[rotated (rope_dim) | nope (d - rope_dim)]``; index
        ``h·d`` points at an appended zero.
        """
        h, d, rd = self.num_heads, self.head_dim, self.rope_dim
        pn, width = self.qk_nope_head_dim, self.qk_nope_head_dim + self.qk_rope_head_dim
        idx = torch.full((h * width,), h * d, dtype=torch.long, device="cpu")
        for j in range(h):
            k, base = j // self.group_size, j * width
            idx[base : base + self.nope_dim] = torch.arange(j * d + rd, (j + 1) * d, device="cpu")
            overflow_pos = base + self.nope_dim
            for t in range(rd):
                f = k * rd + t
                if f < self.qk_rope_head_dim:
                    idx[base + pn + f] = j * d + t
                else:
                    idx[overflow_pos] = j * d + t
                    overflow_pos += 1
        return idx

    def q_gather_index_for_heads(self, start: int, end: int) -> torch.Tensor:
        """The query gather index of heads ``[start, end)`` (a tensor-parallel shard), into
        that shard's compact query ``[(end - start)·d]`` plus one zero."""
        width = self.qk_nope_head_dim + self.qk_rope_head_dim
        d, sentinel = self.head_dim, self.num_heads * self.head_dim
        idx = self.q_gather_index[start * width : end * width]
        return torch.where(idx == sentinel, (end - start) * d, idx - start * d)

    def rope_slot_columns(self, start: int, end: int) -> torch.Tensor:
        """``[end - start, K]``: for each head of ``[start, end)``, the rope-slot columns its
        query uses (its kv-head's rotated dims held in the slot), K = the most any head uses.

        A head's query is zero on every other slot column, so attention computed on
        ``[nope | these columns]`` equals attention over the full ``qk_nope + qk_rope`` dims;
        prefill uses it to attend over ``head_dim``-sized heads whatever the slot width.
        Heads with fewer columns are padded with a column where their query is zero.
        """
        used = []
        for j in range(start, end):
            first = (j // self.group_size) * self.rope_dim
            used.append([f for f in range(first, first + self.rope_dim) if f < self.qk_rope_head_dim])
        width = max(1, max(len(cols) for cols in used))
        rows = []
        for cols in used:
            spare = [f for f in range(self.qk_rope_head_dim) if f not in cols]
            rows.append(cols + spare[: width - len(cols)])
        return torch.tensor(rows, dtype=torch.long, device="cpu")

    @cached_property
    def kv_gather_index(self) -> torch.Tensor:
        """``[kv_lora_rank + qk_rope]`` indices into the compact ``[c (C) | rotated keys (R)]``
        plus one zero (index ``C + R``)."""
        c, r, lr = self.latent_width, self.rope_total, self.kv_lora_rank
        idx = torch.full((lr + self.qk_rope_head_dim,), c + r, dtype=torch.long, device="cpu")
        idx[:c] = torch.arange(c, device="cpu")
        for f in range(r):
            idx[lr + f if f < self.qk_rope_head_dim else c + f - self.qk_rope_head_dim] = c + f
        return idx

    def build_kv_b_proj(self, w_up_k: torch.Tensor, w_up_v: torch.Tensor) -> torch.Tensor:
        """vLLM's ``kv_b_proj`` weight ``[h·(qk_nope + v), kv_lora_rank]``.

        ``w_up_k``: ``[g·(d - rope_dim), C]`` (rows per kv-head), ``w_up_v``: ``[g·d, C]``.
        """
        g, d, rd, c = self.num_kv_heads, self.head_dim, self.rope_dim, self.latent_width
        nd, pn = self.nope_dim, self.qk_nope_head_dim
        if tuple(w_up_k.shape) != (g * nd, c) or tuple(w_up_v.shape) != (g * d, c):
            raise ValueError(
                f"up-projections {tuple(w_up_k.shape)}, {tuple(w_up_v.shape)} do not match "
                f"({g * nd}, {c}), ({g * d}, {c})"
            )
        width = pn + self.v_head_dim
        w = torch.zeros(self.num_heads * width, self.kv_lora_rank, dtype=w_up_k.dtype, device=w_up_k.device)
        for j in range(self.num_heads):
            k, base = j // self.group_size, j * width
            w[base : base + nd, :c] = w_up_k[k * nd : (k + 1) * nd]
            row = base + nd
            for t in range(rd):
                f = k * rd + t
                if f >= self.qk_rope_head_dim:
                    w[row, c + f - self.qk_rope_head_dim] = 1.0
                    row += 1
            w[base + pn : base + pn + d, :c] = w_up_v[k * d : (k + 1) * d]
        return w

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        """The ``layout`` dict of a checkpoint's ``mha2mla`` section (the latent width under its
        on-disk name ``latent_dim``, format version 1)."""
        values = asdict(self)
        values[SERIALISED_LATENT_WIDTH] = values.pop("latent_width")
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "MLALayout":
        values = dict(values)
        if SERIALISED_LATENT_WIDTH in values:
            values["latent_width"] = values.pop(SERIALISED_LATENT_WIDTH)
        return cls(**{k: int(values[k]) for k in cls.__dataclass_fields__ if k in values or k != "latent_width"})


def native_prefill_dims(head_dim: int) -> tuple[int, int]:
    """Smallest native (qk_nope, v) pair that holds a head of ``head_dim`` dims."""
    for nope, rope, v in sorted(NATIVE_PREFILL_DIMS):
        if nope >= head_dim and v >= head_dim:
            return nope, v
    raise ConversionError(
        f"head_dim {head_dim} exceeds every vLLM-native MLA prefill shape {NATIVE_PREFILL_DIMS}"
    )


def max_d_kv_for_cache(num_kv_heads: int, rope_dim: int, cache_size: int) -> int:
    """Largest d_kv whose latent plus rotary keys fit a native cache of ``cache_size``."""
    latent_room = cache_size - NATIVE_ROPE_SLOT - max(0, num_kv_heads * rope_dim - NATIVE_ROPE_SLOT)
    return latent_room // num_kv_heads


def plan_native_layout(
    num_heads: int, num_kv_heads: int, head_dim: int, rope_dim: int, d_kv: int, cache_size: int
) -> MLALayout:
    """Layout that stock vLLM MLA serves with a cache of ``cache_size`` values per token."""
    if cache_size not in NATIVE_HEAD_SIZES:
        raise ConversionError(f"cache size {cache_size} is not one of vLLM's {NATIVE_HEAD_SIZES}")
    nope, v = native_prefill_dims(head_dim)
    return MLALayout(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_dim=rope_dim,
        d_kv=d_kv,
        kv_lora_rank=cache_size - NATIVE_ROPE_SLOT,
        qk_rope_head_dim=NATIVE_ROPE_SLOT,
        qk_nope_head_dim=nope,
        v_head_dim=v,
    )


def plan_exact_layout(num_heads: int, num_kv_heads: int, head_dim: int, rope_dim: int, d_kv: int) -> MLALayout:
    """Layout with the true sizes (no padding): latent C, rope slot R. Needs the plugin's
    own attention backend in vLLM when the shape is not native."""
    return MLALayout(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_dim=rope_dim,
        d_kv=d_kv,
        kv_lora_rank=num_kv_heads * d_kv,
        qk_rope_head_dim=num_kv_heads * rope_dim,
        qk_nope_head_dim=head_dim - rope_dim,
        v_head_dim=head_dim,
    )
