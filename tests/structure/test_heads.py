"""Tests of attention-head removal: split_attention equivalence, remove_heads, head_groups, head_scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from chita_minimal.structure.heads import (HeadAttention, head_groups, head_scores, remove_heads, select_heads,
                                           split_attention)

E, H, D, L, N = 32, 4, 8, 6, 3  # d_model, heads, head_dim, sequence length, batch


def _encoder(batch_first=True):
    layer = nn.TransformerEncoderLayer(d_model=E, nhead=H, dim_feedforward=64, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=batch_first)


class Classifier(nn.Module):
    """Encoder, mean over positions, linear head; optionally returns {"logits": ...}."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.encoder = _encoder(True)
        self.fc = nn.Linear(E, 3)
        self.as_dict = as_dict

    def forward(self, x):
        out = self.fc(self.encoder(x).mean(1))
        return {"logits": out} if self.as_dict else out


def _x(batch_first):
    x = torch.randn(N, L, E)
    return x if batch_first else x.transpose(0, 1)


def _pad_mask():
    m = torch.zeros(N, L, dtype=torch.bool)
    m[0, 4:] = True  # right-padded (what the nested-tensor fast path expects)
    m[2, 2:] = True
    return m


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    sd = model.state_dict()
    return sd.keys() == before.keys() and all(torch.equal(sd[k], v) for k, v in before.items())


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# split_attention


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_equals_encoder_eval_and_train(batch_first):
    model = _encoder(batch_first)
    before = _state(model)
    split = split_attention(model)
    assert all(isinstance(m, HeadAttention) for n, m in split.named_modules() if n.endswith("self_attn"))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in split.modules())
    assert all(isinstance(m, nn.MultiheadAttention) for n, m in model.named_modules() if n.endswith("self_attn"))
    assert _same_state(model, before)
    x, pad = _x(batch_first), _pad_mask()
    valid = ~pad if batch_first else ~pad.T  # positions that are not padding, in the input's layout
    for mode in ("eval", "train"):
        model.train(mode == "train"), split.train(mode == "train")
        for mask in (None, pad):
            with torch.no_grad():  # eval: the original takes torch's fast paths here
                a, b = model(x, src_key_padding_mask=mask), split(x, src_key_padding_mask=mask)
            keep = valid if mask is not None else torch.ones_like(valid)
            assert torch.allclose(a[keep], b[keep], atol=1e-5, rtol=0), (mode, mask is not None)
            a, b = model(x, src_key_padding_mask=mask), split(x, src_key_padding_mask=mask)  # ordinary path
            assert torch.allclose(a, b, atol=1e-5, rtol=0), (mode, mask is not None)
    b.sum().backward()
    assert split.layers[0].self_attn.q.weight.grad is not None


def test_head_attention_matches_mha_directly():
    for bias, kv in ((True, None), (False, 20)):
        mha = nn.MultiheadAttention(E, H, bias=bias, kdim=kv, vdim=kv, batch_first=True).eval()
        assert mha._qkv_same_embed_dim == (kv is None)
        ha = split_attention(mha)
        assert isinstance(ha, HeadAttention) and (ha.q.bias is None) == (not bias)
        q, kv_in = torch.randn(N, L, E), torch.randn(N, 5, kv or E)
        pad = torch.zeros(N, 5, dtype=torch.bool)
        pad[1, 3:] = True
        bool_mask = torch.rand(L, 5) > 0.7
        bool_mask[:, 0] = False
        float_mask3 = torch.randn(N * H, L, 5)
        for kw in (dict(), dict(key_padding_mask=pad), dict(attn_mask=bool_mask, key_padding_mask=pad),
                   dict(attn_mask=float_mask3), dict(average_attn_weights=False, attn_mask=bool_mask)):
            for need in (True, False):
                a, wa = mha(q, kv_in, kv_in, need_weights=need, **kw)
                b, wb = ha(q, kv_in, kv_in, need_weights=need, **kw)
                assert torch.allclose(a, b, atol=1e-5, rtol=0), kw
                assert (wa is None) == (wb is None) and (wa is None or torch.allclose(wa, wb, atol=1e-6)), kw
    causal = nn.Transformer.generate_square_subsequent_mask(L)  # unbatched input with a causal mask
    mha = nn.MultiheadAttention(E, H).eval()
    x = torch.randn(L, E)
    assert torch.allclose(mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0],
                          split_attention(mha)(x, x, x, is_causal=True, need_weights=False)[0], atol=1e-5, rtol=0)


def test_split_attention_decoder_and_unsupported_options():
    dec = nn.TransformerDecoderLayer(d_model=E, nhead=H, dim_feedforward=64, dropout=0.0, batch_first=True).eval()
    split = split_attention(dec)
    tgt, mem = torch.randn(N, L, E), torch.randn(N, 5, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    assert torch.allclose(dec(tgt, mem, tgt_mask=causal, tgt_is_causal=True),
                          split(tgt, mem, tgt_mask=causal, tgt_is_causal=True), atol=1e-5, rtol=0)
    assert head_groups(split) == {"self_attn": H, "multihead_attn": H}
    for kw in (dict(add_bias_kv=True), dict(add_zero_attn=True)):
        with pytest.raises(ValueError, match="add_bias_kv=True or add_zero_attn=True"):
            split_attention(nn.Sequential(nn.MultiheadAttention(E, H, **kw)))


def test_split_attention_keeps_modes_flags_and_sharing():
    mha = nn.MultiheadAttention(E, H)
    mha.in_proj_weight.requires_grad_(False)
    model = nn.ModuleDict({"a": mha, "b": mha}).eval()
    split = split_attention(model)
    assert split["a"] is split["b"] and isinstance(split["a"], HeadAttention) and not split["a"].training
    assert [split["a"].q.weight.requires_grad, split["a"].q.bias.requires_grad] == [False, True]
    assert head_groups(model) == head_groups(split) == {"a": H}


# -----------------------------------------------------------------------------
# remove_heads


def _zero_out_columns(model, drop):
    with torch.no_grad():
        for name, heads in drop.items():
            m = model.get_submodule(name)
            W = m.out_proj.weight if isinstance(m, nn.MultiheadAttention) else m.out.weight
            for h in heads:
                W[:, h * D:(h + 1) * D] = 0


def _keep(model, drop):
    keep = {}
    for name, heads in drop.items():
        keep[name] = torch.ones(head_groups(model)[name], dtype=torch.bool)
        keep[name][heads] = False
    return keep


DROP = {"layers.0.self_attn": [1, 3], "layers.1.self_attn": [0]}


@pytest.mark.parametrize("first", ["split", "raw"])
def test_remove_heads_keeps_function_and_drops_exact_counts(first):
    model = _encoder(True).eval()
    _zero_out_columns(model, DROP)
    src = split_attention(model) if first == "split" else model  # "raw": remove_heads splits itself
    before = _state(src)
    small = remove_heads(src, _keep(src, DROP))
    assert _same_state(src, before)
    assert head_groups(small) == {"layers.0.self_attn": 2, "layers.1.self_attn": 3}
    att = small.layers[0].self_attn
    assert att.q.weight.shape == (2 * D, E) and att.out.weight.shape == (E, 2 * D)
    removed = 3  # heads; each: q, k, v rows (3·D·E weights + 3·D biases) and D·E out columns
    assert _n_params(model) - _n_params(small) == removed * (4 * E * D + 3 * D)
    x, pad = _x(True), _pad_mask()
    for mask in (None, pad):
        ref = model(x, src_key_padding_mask=mask)  # ordinary path (parameters require grad)
        assert torch.allclose(small(x, src_key_padding_mask=mask), ref, atol=1e-5, rtol=0)
    assert not small.training and all(p.requires_grad for p in small.parameters())


def test_remove_heads_with_zero_values_keeps_function_and_flags():
    model = split_attention(_encoder(False)).train()  # train mode, dropout 0: deterministic
    att = model.layers[1].self_attn
    with torch.no_grad():
        att.v.weight[2 * D:3 * D] = 0
        att.v.bias[2 * D:3 * D] = 0
    att.k.weight.requires_grad_(False)
    keep = {"layers.1.self_attn": torch.tensor([True, True, False, True])}
    small = remove_heads(model, keep)
    new = small.layers[1].self_attn
    assert new.num_heads == 3 and new.training and not new.k.weight.requires_grad and new.q.weight.requires_grad
    assert torch.equal(new.out.bias, att.out.bias)
    assert torch.equal(new.q.weight, torch.cat([att.q.weight[:2 * D], att.q.weight[3 * D:]]))
    x = _x(False)
    assert torch.allclose(small(x), model(x), atol=1e-5, rtol=0)


def test_remove_heads_bad_keep():
    model = _encoder(True)
    before = _state(model)
    ok = torch.ones(H, dtype=torch.bool)
    with pytest.raises(TypeError, match="keep must be a dict"):
        remove_heads(model, [ok])
    with pytest.raises(ValueError, match=r"unknown attention module\(s\) \['layers.5.self_attn'\].*layers.0.self_attn"):
        remove_heads(model, {"layers.5.self_attn": ok})
    with pytest.raises(TypeError, match=r"keep\['layers.0.self_attn'\] must be a bool tensor"):
        remove_heads(model, {"layers.0.self_attn": [True] * H})
    with pytest.raises(ValueError, match=r"keep\['layers.0.self_attn'\] must be a bool tensor of shape \(4,\)"):
        remove_heads(model, {"layers.0.self_attn": torch.ones(H)})
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        remove_heads(model, {"layers.0.self_attn": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="keeps no head"):
        remove_heads(model, {"layers.0.self_attn": torch.zeros(H, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no attention module"):
        remove_heads(nn.Linear(2, 2), {})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        remove_heads("model", {})
    assert _same_state(model, before)


# -----------------------------------------------------------------------------
# head_scores and select_heads


def _zero_heads(model, drop):
    with torch.no_grad():
        for name, heads in drop.items():
            m = model.get_submodule(name)
            for h in heads:
                for lin in (m.q, m.k, m.v):
                    lin.weight[h * D:(h + 1) * D] = 0
                    lin.bias[h * D:(h + 1) * D] = 0
                m.out.weight[:, h * D:(h + 1) * D] = 0


def test_head_scores_norms():
    model = split_attention(_encoder(True))
    _zero_heads(model, DROP)
    before = _state(model)
    l1, l2 = head_scores(model), head_scores(model, kind="l2")
    assert _same_state(model, before)
    for name in ("layers.0.self_attn", "layers.1.self_attn"):
        assert l1[name].shape == l2[name].shape == (H,)
        zero = torch.zeros(H, dtype=torch.bool)
        zero[DROP[name]] = True
        assert torch.all(l1[name][zero] == 0) and torch.all(l1[name][~zero] > 0) and torch.all(l2[name][zero] == 0)
    m = model.layers[1].self_attn  # head 2 by hand
    rows = slice(2 * D, 3 * D)
    by_hand = sum(lin.weight[rows].abs().sum() + lin.bias[rows].abs().sum() for lin in (m.q, m.k, m.v))
    by_hand = by_hand + m.out.weight[:, rows].abs().sum()
    assert torch.isclose(l1["layers.1.self_attn"][2], by_hand)
    raw = head_scores(_encoder(True))  # nn.MultiheadAttention: scored on its split copy
    assert list(raw) == ["layers.0.self_attn", "layers.1.self_attn"]
    with pytest.raises(ValueError, match="kind must be one of"):
        head_scores(model, kind="l3")
    with pytest.raises(ValueError, match="needs data and n_grads"):
        head_scores(model, kind="taylor")


@pytest.mark.parametrize("as_dict", [False, True])
def test_head_scores_taylor_and_gate(as_dict):
    model = Classifier(as_dict).train()
    _zero_out_columns(model, {f"encoder.{k}": v for k, v in DROP.items()})
    x, y = torch.randn(16, L, E), torch.randint(0, 3, (16,))
    before = _state(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    t = head_scores(model, loader, kind="taylor", n_grads=4, batch_size=2)
    g = head_scores(model, TensorDataset(x, y), kind="gate", n_grads=4, batch_size=2)
    assert _same_state(model, before) and model.training
    for name, heads in DROP.items():
        for s in (t, g):
            assert s[f"encoder.{name}"].shape == (H,) and torch.all(s[f"encoder.{name}"][heads] == 0)
        assert torch.all(t[f"encoder.{name}"].sum() > 0)
    # the gate score is |dL/dξ| for a gate ξ on the head's output: check one head against autograd
    split = split_attention(model).eval()
    att = split.encoder.layers[0].self_attn
    gate = torch.ones(H, requires_grad=True)
    hook = att.out.register_forward_pre_hook(lambda m, a: (a[0] * gate.repeat_interleave(D),))
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(16, generator=gen)[:8].view(4, 2)
    by_hand = torch.zeros(H)
    for row in idx:
        out = split(x[row])
        logits = out["logits"] if as_dict else out
        by_hand += torch.autograd.grad(nn.functional.cross_entropy(logits, y[row]), gate)[0].abs() / 4
    hook.remove()
    assert torch.allclose(g["encoder.layers.0.self_attn"], by_hand, atol=1e-5, rtol=1e-4)


def test_select_heads_then_remove():
    model = split_attention(_encoder(True))
    _zero_heads(model, DROP)
    keep, frac = select_heads(head_scores(model), 3 / 8)
    assert frac == 3 / 8
    assert [torch.nonzero(~m).squeeze(1).tolist() for m in keep.values()] == [[1, 3], [0]]
    small = remove_heads(model, keep)
    assert head_groups(small) == {"layers.0.self_attn": 2, "layers.1.self_attn": 3}
    keep, frac = select_heads({"a": torch.tensor([1.0, 2.0])}, 0.9)
    assert keep["a"].tolist() == [False, True] and frac == 0.5  # the last head always stays
    with pytest.raises(ValueError, match="fraction"):
        select_heads({"a": torch.ones(2)}, 1.0)
