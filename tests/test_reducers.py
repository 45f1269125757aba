"""Each reducer as a pure function on random tensors."""
import math

import torch

from vitprune.reducers import (
    ats_cap,
    ats_sample,
    ats_scores,
    ats_select,
    bipartite_matching,
    cls_attention,
    evit_keep_count,
    evit_reduce,
    merge_tokens,
    protect_penalty,
    tome_reduce,
)


def test_cls_attention_is_the_first_row_of_full_attention():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    bias = torch.randn(2, 1, 1, 10)
    full = ((q @ k.transpose(-2, -1)) * 8 ** -0.5 + bias).softmax(-1)
    row = cls_attention(q[:, :, :1], k, 8 ** -0.5, bias)
    assert row.shape == (2, 3, 10)
    torch.testing.assert_close(row, full[:, :, 0])


def test_evit_keeps_top_k_prefix_untouched_and_fuses_the_rest():
    torch.manual_seed(0)
    x = torch.randn(2, 2 + 8, 4)  # two prefix tokens
    attn = torch.rand(2, 10)
    out, size, index = evit_reduce(x, attn, num_prefix=2, keep_count=3, fuse=True)
    assert out.shape == (2, 2 + 3 + 1, 4) and size is None
    torch.testing.assert_close(out[:, :2], x[:, :2])
    for b in range(2):
        top = (attn[b, 2:].topk(3).indices + 2).sort().values
        assert index[b, 2:].tolist() == top.tolist()
        torch.testing.assert_close(out[b, 2:5], x[b, top])
        dropped = [j for j in range(2, 10) if j not in top.tolist()]
        fused = (x[b, dropped] * attn[b, dropped].unsqueeze(-1)).sum(0)  # raw weights, not renormalised
        torch.testing.assert_close(out[b, 5], fused)


def test_evit_without_fusion_drops_and_carries_sizes():
    x, attn = torch.randn(1, 9, 4), torch.rand(1, 9)
    size = torch.arange(1.0, 10.0).view(1, 9, 1)
    out, out_size, index = evit_reduce(x, attn, num_prefix=1, keep_count=4, fuse=False, size=size)
    assert out.shape == (1, 5, 4)
    torch.testing.assert_close(out_size, size.gather(1, index.unsqueeze(-1)))


def test_evit_keep_count_rounds_up():
    assert evit_keep_count(196, 0.7) == math.ceil(0.7 * 196) == 138
    assert evit_keep_count(196, 1.0) == 196
    assert evit_keep_count(3, 0.01) == 1


def test_ats_scores_weight_attention_by_value_norm_and_sum_to_one():
    torch.manual_seed(0)
    attn = torch.rand(2, 3, 7).softmax(-1)
    v = torch.randn(2, 3, 7, 4)
    scores = ats_scores(attn, v, num_prefix=1)
    norms = v.transpose(1, 2).flatten(2).norm(dim=-1)
    expected = (attn.sum(1) * norms)[:, 1:]
    torch.testing.assert_close(scores, expected / expected.sum(1, keepdim=True))
    torch.testing.assert_close(scores.sum(1), torch.ones(2))


def test_ats_keeps_fewer_tokens_for_peaked_attention():
    peaked = torch.full((1, 100), 1e-4)
    peaked[0, :3] = 1.0
    peaked = peaked / peaked.sum()
    flat = torch.full((1, 100), 0.01)
    kept_peaked = ats_sample(peaked, 50).sum().item()
    kept_flat = ats_sample(flat, 50).sum().item()
    assert kept_peaked < 10 < kept_flat <= 50


def test_ats_never_keeps_padding_and_pads_to_batch_max():
    scores = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    keep = ats_sample(scores, 4, valid)
    assert not keep[0, 3]
    index, valid_out = ats_select(keep, num_prefix=1)
    counts = keep.sum(1)
    assert index.shape[1] == 1 + counts.max()
    assert valid_out.sum(1).tolist() == (counts + 1).tolist()
    assert (index[:, 0] == 0).all()  # the CLS token comes first
    for b in range(2):  # kept tokens first, in spatial order
        kept = (keep[b].nonzero().flatten() + 1).tolist()
        assert index[b, 1:1 + len(kept)].tolist() == kept


def test_ats_static_padding():
    keep = torch.tensor([[True, False, True, False]])
    index, valid = ats_select(keep, num_prefix=1, pad_to=4)
    assert index.shape == (1, 5) and valid.tolist() == [[True, True, True, False, False]]


def test_ats_cap_ratio_or_count():
    assert ats_cap(1.0, 197) == 197
    assert ats_cap(0.5, 197) == 99
    assert ats_cap(64, 197) == 64


def test_tome_merges_r_pairs_size_weighted_and_protects_prefix():
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 10, 4)
    size = torch.ones(2, 11, 1)
    out, out_size = tome_reduce(x, size, x, num_prefix=1, r=3)
    assert out.shape == (2, 8, 4) and out_size.shape == (2, 8, 1)
    torch.testing.assert_close(out[:, 0], x[:, 0])
    torch.testing.assert_close(out_size.sum(1), size.sum(1))  # mass is conserved
    torch.testing.assert_close((out * out_size).sum(1), (x * size).sum(1))  # weighted mean preserved


def test_tome_merges_the_most_similar_pair():
    x = torch.eye(6).unsqueeze(0)  # orthogonal tokens...
    x[0, 4] = x[0, 1] * 2  # ...except token 4 (set A) is parallel to token 1 (set B)
    matching = bipartite_matching(x, r=1)
    assert matching.src.tolist() == [[2]] and matching.dst.tolist() == [[0]]  # A index 2 = token 4, B index 0 = token 1
    merged, sizes = merge_tokens(x, torch.tensor([[[1.0], [3.0], [1.0], [1.0], [1.0], [1.0]]]), matching)
    assert merged.shape == (1, 5, 6)
    # token 1 (size 3) and token 4 (size 1) become one token of size 4 at their weighted mean
    b_first = merged[0, 2]
    torch.testing.assert_close(b_first, (x[0, 1] * 3 + x[0, 4]) / 4)
    assert sizes[0, 2, 0] == 4


def test_tome_r_is_capped_at_half_the_tokens():
    x = torch.randn(1, 1 + 5, 4)
    out, _ = tome_reduce(x, torch.ones(1, 6, 1), x, num_prefix=1, r=100)
    assert out.shape[1] == 1 + 3


def test_tome_protect_keeps_the_attended_token_and_zero_is_plain_tome():
    x = torch.eye(6).unsqueeze(0)
    x[0, 4] = x[0, 1] * 2  # token 4 (A) is the only one parallel to a B token: ToMe merges it first
    x[0, 2] = x[0, 3] + 0.5 * x[0, 5]  # token 2 (A) is the next most similar, to token 3 (B)
    uniform = torch.full((1, 6), 1 / 6)
    torch.testing.assert_close(protect_penalty(uniform, 0.2), torch.full((1, 6), 0.2))  # an even share costs `weight`
    plain = bipartite_matching(x, r=1)
    even = bipartite_matching(x, r=1, penalty=protect_penalty(uniform, 0.3))
    assert all(torch.equal(a, b) for a, b in zip(even, plain))  # an even penalty changes nothing
    attended = torch.tensor([[0.05, 0.05, 0.05, 0.05, 0.75, 0.05]])  # the class token reads token 4
    protected = bipartite_matching(x, r=1, penalty=protect_penalty(attended, 0.2))
    assert plain.src.tolist() == [[2]] and protected.src.tolist() == [[1]]  # token 2 merges instead of token 4
    out, size = tome_reduce(x, torch.ones(1, 6, 1), x, 0, 1, penalty=protect_penalty(attended, 0.2))
    assert out.shape == (1, 5, 6) and any(torch.equal(row, x[0, 4]) for row in out[0])  # token 4 is intact
