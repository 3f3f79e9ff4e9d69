"""Varlen attention for padding-free packed rows: same logits and gradients as each sequence alone."""

from __future__ import annotations

import pytest
import torch

from troupe.train.attention import register_varlen_attention, segment_bounds


def test_segment_bounds_follow_position_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert segment_bounds(pos) == [(0, 3), (3, 5), (5, 9)]
    assert segment_bounds(torch.arange(4).unsqueeze(0)) == [(0, 4)]
    # a row that does not start at position 0 (a truncated continuation) is still one segment
    assert segment_bounds(torch.tensor([[5, 6, 7, 0, 1]])) == [(0, 3), (3, 5)]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa")
    var = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa")
    var.set_attn_implementation(register_varlen_attention())
    return ref.float().eval(), var.float().eval()


def test_packed_row_matches_each_sequence_alone(models):
    ref, var = models
    g = torch.Generator().manual_seed(1)
    lens = [7, 12, 5]
    seqs = [torch.randint(0, ref.config.vocab_size, (n,), generator=g) for n in lens]
    row = torch.cat(seqs).unsqueeze(0)
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)

    alone = torch.cat([ref(input_ids=s.unsqueeze(0)).logits[0] for s in seqs])
    packed = var(input_ids=row, position_ids=pos).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    # transformers' own SDPA over the packed row (dense block-diagonal mask, built only without a KV
    # cache - TRL passes use_cache=False in training) agrees too: same semantics
    dense = ref(input_ids=row, position_ids=pos, use_cache=False).logits[0]
    torch.testing.assert_close(dense, alone, rtol=1e-4, atol=1e-4)
    # without position ids the row is one long sequence: attention crosses boundaries, logits differ
    assert not torch.allclose(var(input_ids=row).logits[0, lens[0] :], alone[lens[0] :], atol=1e-3)


def test_packed_row_gradients_match_dense_mask(models):
    ref, var = models
    g = torch.Generator().manual_seed(2)
    lens = [9, 4, 11]
    row = torch.randint(0, ref.config.vocab_size, (1, sum(lens)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    grads = []
    for m in (ref, var):
        m.zero_grad()
        m(input_ids=row, position_ids=pos, labels=row, use_cache=False).loss.backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_padded_batch_falls_back_to_sdpa(models):
    ref, var = models
    ids = torch.randint(0, ref.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    torch.testing.assert_close(
        var(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits
    )


def test_training_attention_choice():
    from troupe.train.attention import VARLEN_ATTENTION
    from troupe.train.distributed import training_attention

    assert training_attention({}, padding_free=True) == VARLEN_ATTENTION
    assert training_attention({"attn_implementation": "auto"}, padding_free=False) is None
    assert training_attention({"attn_implementation": "varlen"}, padding_free=False) == VARLEN_ATTENTION
    assert training_attention({"attn_implementation": "eager"}, padding_free=True) == "eager"
