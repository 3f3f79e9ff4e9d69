"""Variable-length ("varlen") attention for padding-free packed batches without FlashAttention.

TRL's padding-free collator flattens a device batch into one row ``[1, T]`` whose ``position_ids``
restart at 0 at every sequence. FlashAttention-2 reads those boundaries as ``cu_seqlens`` and attends
inside each sequence only (Dao 2023, arXiv:2307.08691, ``flash_attn_varlen_func``). transformers' SDPA
path instead builds a block-diagonal ``[T, T]`` mask and runs dense attention over the whole row, so
attention costs grow with ``T**2`` instead of ``sum(len_i**2)``: on CPU (no FlashAttention) that made
padding-free packing slower than padded batches (``benchmarks/bench_sft.py``).

:func:`varlen_sdpa_attention` does what ``flash_attn_varlen_func`` does with PyTorch's
``scaled_dot_product_attention``: one causal SDPA call per packed sequence. It is registered in
transformers' ``AttentionInterface`` (and ``AttentionMaskInterface``) as :data:`VARLEN_ATTENTION` and used for training only;
saved checkpoints keep ``sdpa``. Its mask function is transformers' ``sdpa_mask``, so a row that is
not packed gets exactly transformers' SDPA behaviour.
"""

from __future__ import annotations

from typing import Any

#: name under which the function is registered in transformers' attention interfaces
VARLEN_ATTENTION = "troupe_varlen_sdpa"


def segment_bounds(position_ids) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the packed sequences in a ``[1, T]`` position-id row.

    A new sequence starts wherever the position id does not follow its predecessor by 1 (TRL's
    padding-free collator restarts positions at 0 per sequence; same rule as transformers'
    ``find_packed_sequence_indices``); the first token always starts one. ``end`` is exclusive.
    """
    row = position_ids[0]
    starts = [0, *((row[1:] - row[:-1]) != 1).nonzero().flatten().add(1).tolist()]
    ends = [*starts[1:], int(row.shape[0])]
    return list(zip(starts, ends, strict=True))


def varlen_sdpa_attention(
    module: Any,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
):
    """Causal attention inside each packed sequence of a padding-free row.

    Shapes (transformers attention-interface convention): ``query`` ``[B, H, T, D]``, ``key``/``value``
    ``[B, H_kv, T, D]`` (grouped-query attention when ``H_kv < H``); returns ``([B, T, H, D], None)``.
    Needs ``position_ids`` ``[1, T]`` in ``kwargs`` for packed rows (the block-diagonal mask built for
    them is then not used); anything else (a batch of padded rows, a KV cache during generation) goes
    to transformers' own SDPA function.
    """
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = (
        position_ids is not None
        and query.shape[0] == 1
        and position_ids.shape[-1] == query.shape[2] == key.shape[2] > 1
    )
    if not packed:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    gqa = key.shape[1] != query.shape[1]
    outs = [
        F.scaled_dot_product_attention(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        for s, e in segment_bounds(position_ids)
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register_varlen_attention() -> str:
    """Register :func:`varlen_sdpa_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    return VARLEN_ATTENTION
