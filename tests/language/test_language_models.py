"""Language models through prune(): the loss adapter, Conv1D, embeddings and LM head left dense, the layer-wise
methods and their sequential driver, perplexity, token windows, and clear errors (model untouched)."""

import copy
import math

import pytest
import torch

import chita_minimal as cm
from chita_minimal.data.text import token_windows
from chita_minimal.network import language, sequential
from chita_minimal.network.fisher import default_loss
from chita_minimal.network.params import prunable_names

from tiny_lms import VOCAB, tiny, windows

LAYER_METHODS = ["mp-layer", "wanda", "sparsegpt", "alps", "chita-layer"]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_conv1d_is_prunable_and_embeddings_and_head_stay_dense():
    gpt2 = tiny("gpt2")
    names = prunable_names(gpt2)
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.1.mlp.c_proj.weight" in names
    assert not any("wte" in n or "wpe" in n or "lm_head" in n for n in names)
    assert any("wte" in n for n in prunable_names(gpt2, embeddings=True))
    opt = tiny("opt")
    assert not any("embed" in n or "lm_head" in n for n in prunable_names(opt))


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_chita_prunes_the_blocks_with_the_next_token_loss(kind):
    model = tiny(kind)
    data = windows(4, 8)
    emb = {n: p.clone() for n, p in model.named_parameters() if "emb" in n or "wte" in n or "wpe" in n}
    rep = cm.prune(model, data, 0.5, "chita-iht", n_grads=4)
    assert abs(rep.achieved - 0.5) < 1e-3
    assert all(s > 0.3 for s in rep.layer_sparsity.values())  # every block's maps, not the embedding
    for n, p in model.named_parameters():
        if n in emb:
            assert torch.equal(p, emb[n])
    assert "lm_head.weight" not in rep.layer_sparsity


def test_default_loss_next_token_and_own_loss_and_clear_error():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    direct = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    assert torch.allclose(default_loss(logits, labels), direct)

    class Out:
        loss = torch.tensor(3.0)

    assert float(default_loss(Out(), labels)) == 3.0
    with pytest.raises(ValueError, match="loss_fn"):
        default_loss(torch.randn(2, 5, 7), torch.randint(0, 7, (3,)))


def test_perplexity_equals_a_direct_computation():
    model = tiny("llama")
    data = windows(3, 10)
    ids = data.ids
    with torch.no_grad():
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert math.isclose(language.perplexity(model, data, batch_size=2), math.exp(float(nll)), rel_tol=1e-5)


def test_token_windows_and_their_errors():
    ids = torch.arange(100)
    w = token_windows(ids, None, 3, 20, random=False)
    assert torch.equal(w.ids[1], torch.arange(20, 40)) and len(w) == 3
    r1, r2 = token_windows(ids, None, 4, 10, seed=1), token_windows(ids, None, 4, 10, seed=1)
    assert torch.equal(r1.ids, r2.ids)
    assert set(w[0]) == {"input_ids", "labels"}
    with pytest.raises(ValueError, match="length"):
        token_windows(ids, None, 1, 200)
    with pytest.raises(ValueError, match="n = 6"):
        token_windows(ids, None, 6, 20, random=False)
    with pytest.raises(ValueError, match="empty"):
        cm.data.text.tokenize("   ", tokenizer=lambda t, **k: {"input_ids": []})


@pytest.mark.parametrize("method", LAYER_METHODS)
@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_layer_methods_prune_every_block_map_exactly(kind, method):
    model = tiny(kind)
    rep = cm.prune(model, windows(), 0.6, method)
    assert rep.layer_sparsity and all(abs(s - 0.6) < 0.02 for s in rep.layer_sparsity.values())
    for name, mask in rep.masks.items():
        w = dict(model.named_parameters())[name]
        assert torch.equal(w != 0, mask) or bool(((w != 0) & ~mask).sum() == 0)
    assert any("left dense" in note for note in rep.notes)


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_layer_methods_n_m_is_exact(method):
    model = tiny("llama")
    cm.prune(model, windows(), 0.5, method, pattern="2:4")
    for _, layers in enumerate(sequential.block_layers(model)):
        for m in layers.values():
            W = language.weight_matrix(m)
            assert int((W.reshape(W.shape[0], -1, 4) != 0).sum(-1).max()) <= 2


def test_wanda_equals_its_formula():
    g = torch.Generator().manual_seed(0)
    W, norms = torch.randn(6, 8, generator=g), torch.rand(8, generator=g)
    Wp, mask = cm.solver.layer.wanda(W, norms, 24)
    score = W.abs() * norms.sqrt()
    for r in range(6):
        keep = torch.topk(score[r], 4).indices
        assert set(keep.tolist()) == set(mask[r].nonzero().squeeze(1).tolist())
    assert torch.equal(Wp, W * mask)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_sequential_calibration_sees_the_pruned_prefix(arch):
    """The Gram matrix the driver hands every layer equals that of a direct forward pass through the final pruned
    model: blocks < i pruned, and within block i the maps before it (true sequential)."""
    model = tiny(arch)
    data = windows(4, 12)
    seen = {}

    from dataclasses import dataclass

    from chita_minimal.methods.layer_method import LayerMethod

    @dataclass
    class Recorder(LayerMethod):
        name = "recorder"
        n_samples: int | None = None

        def prune_layer(self, W, stat, k, pattern):
            seen[len(seen)] = stat.clone()
            order.append(weight_name[W.data_ptr()])  # the layer's own storage (Conv1D: its transpose)
            return cm.solver.layer.magnitude(W, k)

    names = [n for layers in sequential.block_layers(model) for n in layers]
    weight_name = {dict(model.named_parameters())[n].data_ptr(): n for n in names}
    order = []
    sequential.prune_blocks(model, data.ids, Recorder(), sparsity=0.5, batch_size=3)
    grams = {}
    mods = dict(model.named_modules())
    hooks = [mods[n.rsplit(".", 1)[0]].register_forward_pre_hook(
        lambda m, a, n=n: grams.__setitem__(n, grams.get(n, 0) + (lambda x: x.T.double() @ x.double())(
            a[0].reshape(-1, a[0].shape[-1])))) for n in names]
    with torch.no_grad():
        model(data.ids)
    for h in hooks:
        h.remove()
    N = data.ids.numel()
    assert len(seen) == len(names)
    for i, n in enumerate(order):
        assert torch.allclose(seen[i], grams[n] / N, rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("arch,stages", [
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    ("opt", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]),
    ("gpt2", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
])
def test_layer_stages_follow_the_forward_pass(arch, stages):
    """Maps that read one tensor form a stage, in call order; a map the block never calls is named in the error."""
    model = tiny(arch)
    _, blocks = cm.network.language.decoder_blocks(model)
    layers = sequential.block_layers(model)[0]
    inputs = sequential.capture_inputs(model, windows(2, 8).ids, 2, "cpu")
    got = sequential.layer_stages(blocks[0], inputs, layers)
    assert [[n.split(".0.", 1)[1].removesuffix(".weight") for n in stage] for stage in got] == stages
    stranger = {**layers, "extra.weight": torch.nn.Linear(4, 4)}
    with pytest.raises(ValueError, match="extra.weight"):
        sequential.layer_stages(blocks[0], inputs, stranger)


def test_input_statistics_share_a_product_only_for_the_same_unchanged_tensor():
    """Layers fed the same tensor share one product; a different tensor at the same address (the allocator reuses a
    freed activation's memory for the next one of the same shape) or the same tensor changed in place gets its own.
    Keyed on the address, the statistics took the previous input's product at random, and layer-wise pruning of a
    language model was not reproducible from one run to the next."""
    torch.manual_seed(0)
    layers = {n: torch.nn.Linear(8, 4) for n in ("q", "k", "o", "up")}
    stats = sequential.InputStatistics(layers, "gram")
    buf = torch.randn(2, 16, 8)
    x1 = buf.view(32, 8)
    layers["q"](x1)
    layers["k"](x1)  # the same tensor: one product
    first = x1.clone()
    buf.copy_(torch.randn(2, 16, 8))
    x2 = buf.view(32, 8)  # a new tensor at the same address, same shape
    assert x2.data_ptr() == x1.data_ptr()
    layers["o"](x2)
    x2.mul_(3.0)  # the same tensor, changed in place
    layers["up"](x2)
    stats.remove()
    gram = lambda x: (x.T.double() @ x.double()) / x.shape[0]  # noqa: E731
    assert torch.allclose(stats.pop("q"), gram(first)) and torch.allclose(stats.pop("k"), gram(first))
    assert torch.allclose(stats.pop("o"), gram(x2 / 3.0))
    assert torch.allclose(stats.pop("up"), gram(x2))


@pytest.mark.parametrize("bad,match", [
    (dict(sparsity=1.2), "sparsity"),
    (dict(pattern="3:7"), "divisible|3:7|pattern"),
    (dict(n_samples=99), "n_samples"),
    (dict(names=["lm_head.weight"]), "decoder blocks"),
    (dict(method="sparsegpt", sequential=True), "sequential apply to other models"),
])
def test_bad_input_clear_error_model_untouched(bad, match):
    model = tiny("llama")
    before = state(model)
    kw = dict(sparsity=0.5, method="wanda")
    kw.update(bad)
    if "pattern" in bad:
        kw["sparsity"] = 1 - 3 / 7
    with pytest.raises((ValueError, TypeError), match=match):
        cm.prune(model, windows(), **kw)
    assert same(before, state(model))


def test_model_without_decoder_blocks_gets_a_clear_error():
    with pytest.raises(ValueError, match="decoder blocks"):
        language.decoder_blocks(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_layer_methods_on_a_plain_network_take_one_calibration_pass():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.zeros(64, dtype=torch.long))
    for method in ("wanda", "alps", "chita-layer"):
        m = copy.deepcopy(net)
        rep = cm.prune(m, data, 0.5, method, n_samples=32)
        assert abs(rep.achieved - 0.5) < 1e-6


def test_n_samples_is_the_calibration_option():
    with pytest.raises(cm.methods.OptionError, match="n_samples"):
        cm.prune(tiny("llama"), windows(), 0.5, "chita", n_samples=4)
    rep = cm.prune(tiny("llama"), windows(8), 0.5, "sparsegpt", n_samples=4)
    assert rep.n_grads == 4


@pytest.mark.parametrize("sparse", [False, True])
def test_save_and_load_a_pruned_lm_with_a_tied_head(tmp_path, sparse):
    model = tiny("llama")
    report = cm.prune(model, windows(), 0.5, "wanda")
    path = cm.save_pruned(model, report, tmp_path / "lm.safetensors", sparse=sparse)
    loaded = cm.load_pruned(lambda: tiny("llama", seed=1), path)
    for (name, a), b in zip(loaded.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # still tied


def test_n_m_on_gpt2_conv1d_runs_along_the_inputs():
    """GPT-2's Conv1D stores W as in × out: a 2:4 pattern through the gradient path keeps 2 of every 4 consecutive
    inputs of each output (along the stored columns), as for a Linear and as the layer-wise driver does."""
    model = tiny("gpt2")
    cm.prune(model, windows(4, 8), 0.5, "chita-iht", n_grads=4, pattern="2:4")
    conv = [m for m in model.modules() if language.is_conv1d(m)]
    assert conv
    for m in conv:
        rows = m.weight.detach().T  # (out, in)
        assert ((rows.reshape(rows.shape[0], -1, 4) != 0).sum(-1) == 2).all()


@pytest.mark.parametrize("method", ["lm-magnitude", "lm-wanda", "lm-taylor", "lm-chita"])
def test_shrink_removes_neurons_and_kv_groups_of_a_llama(method):
    """cm.shrink on a tiny Llama (2 KV groups of 2 query heads): the budget of decoder multiply-adds is met, the
    units are gone from the weights, the model runs and generates, and the model given is untouched."""
    from chita_minimal.network.lm_structure import decoder_macs

    model = tiny("llama")
    before = state(model)
    data = windows(4, 12)
    report = cm.shrink(model, data, 0.5, method)
    small = report.model
    assert 0.4 < report.achieved <= 0.5 + 1e-9
    assert report.achieved == pytest.approx(1 - decoder_macs(small) / decoder_macs(model))
    for block in small.model.layers:
        assert block.mlp.gate_proj.out_features == block.mlp.down_proj.in_features < 48
        assert block.self_attn.k_proj.out_features == 8  # one of the two key/value groups (head_dim 8) kept
        assert block.self_attn.q_proj.out_features == block.self_attn.o_proj.in_features == 16
    with torch.no_grad():
        out = small(data.ids[:2]).logits
    assert out.shape == (2, 12, VOCAB) and torch.isfinite(out).all()
    small.generate(data.ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert same(before, state(model))
    if method == "lm-magnitude":  # reads weights only: no data needed, the same choice
        again = cm.shrink(model, None, 0.5, method)
        assert all(torch.equal(again.keep[k], report.keep[k]) for k in report.keep)


def test_shrink_keeps_the_function_when_the_removed_units_are_zero():
    """Neurons whose down_proj columns are zero and a key/value group whose o_proj columns are zero contribute
    nothing: removing exactly them (lm-magnitude picks them: lowest norms) leaves the logits unchanged."""
    model = tiny("llama")
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.down_proj.weight[:, :24] = 0
            block.mlp.gate_proj.weight[:24] = 0
            block.mlp.up_proj.weight[:24] = 0
            block.self_attn.o_proj.weight[:, :16] = 0  # group 0: query heads 0 and 1 (head_dim 8)
            block.self_attn.q_proj.weight[:16] = 0
            block.self_attn.k_proj.weight[:8] = 0
            block.self_attn.v_proj.weight[:8] = 0
    data = windows(4, 12)
    report = cm.shrink(model, data, 0.5, "lm-magnitude")
    assert all(not k[:24].any() if k.numel() == 48 else not k[0] for k in report.keep.values())
    with torch.no_grad():
        assert torch.allclose(report.model(data.ids).logits, model(data.ids).logits, atol=1e-5)


def test_taylor_unit_product_is_the_derivative_of_the_loss_along_the_unit():
    """Σ_{θ ∈ unit} θ·∂L/∂θ = d/ds L(θ with the unit's parameters scaled by s) at s = 1, for an MLP neuron
    (gate and up rows, down column) and a key/value group (its q/k/v rows and o_proj columns); the Taylor score
    of one batch is its square, the model is left as it was."""
    from chita_minimal.network.lm_structure import taylor_unit_scores, unit_products

    model = tiny("llama")
    before = state(model)
    x = windows(2, 12).ids
    model(x, labels=x).loss.backward()
    products = unit_products(model)
    model.zero_grad()
    q_rows, kv_rows = torch.arange(16, 32), torch.arange(8, 16)  # group 1: query heads 2, 3 (head_dim 8)
    cases = {"model.layers.0.mlp.down_proj": (5, {"model.layers.0.mlp.gate_proj.weight": (0, 5),
                                                  "model.layers.0.mlp.up_proj.weight": (0, 5),
                                                  "model.layers.0.mlp.down_proj.weight": (1, 5)}),
             "model.layers.1.self_attn.o_proj": (1, {"model.layers.1.self_attn.q_proj.weight": (0, q_rows),
                                                     "model.layers.1.self_attn.k_proj.weight": (0, kv_rows),
                                                     "model.layers.1.self_attn.v_proj.weight": (0, kv_rows),
                                                     "model.layers.1.self_attn.o_proj.weight": (1, q_rows)})}
    params = dict(model.named_parameters())
    for consumer, (unit, scaled) in cases.items():
        s = torch.ones((), dtype=torch.float64, requires_grad=True)
        new = {}
        for name, (dim, index) in scaled.items():
            scale = torch.ones(params[name].shape[dim], dtype=torch.float64)
            scale = scale.index_put((torch.as_tensor(index).reshape(-1),), s.expand(torch.as_tensor(index).numel()))
            shape = (-1, 1) if dim == 0 else (1, -1)
            new[name] = params[name].detach() * scale.view(shape).float()
        loss = torch.func.functional_call(model, new, (x,), {"labels": x}).loss
        (d,) = torch.autograd.grad(loss, s)
        assert float(products[consumer][unit]) == pytest.approx(float(d), rel=1e-4) and abs(float(d)) > 1e-6
    scores = taylor_unit_scores(model, x, batch_size=2)
    assert torch.allclose(scores["model.layers.0.mlp.down_proj"], products["model.layers.0.mlp.down_proj"] ** 2)
    assert same(before, state(model)) and all(p.grad is None for p in model.parameters())


def test_a_shrunk_llama_is_saved_and_loaded_back(tmp_path):
    """save_shrunk / load_shrunk: blocks of different widths come back with the same weights and logits, the head
    tied to the embeddings; a directory of a dense model is refused with a clear error."""
    from chita_minimal.network.lm_structure import load_shrunk, save_shrunk, unit_counts

    model = tiny("llama")
    data = windows(4, 12)
    small = cm.shrink(model, data, 0.4, "lm-wanda").model
    small.model.layers[1].mlp = cm.shrink(model, data, 0.2, "lm-wanda").model.model.layers[1].mlp  # other width
    save_shrunk(small, tmp_path / "small")
    loaded = load_shrunk(tmp_path / "small")
    assert unit_counts(loaded) == unit_counts(small) and len(set(unit_counts(small)["mlp_neurons"])) == 2
    assert not hasattr(small.config, "chita_unit_counts")
    with torch.no_grad():
        assert torch.equal(loaded(data.ids).logits, small(data.ids).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    model.save_pretrained(str(tmp_path / "dense"))
    with pytest.raises(ValueError, match="not written by save_shrunk"):
        load_shrunk(tmp_path / "dense")


def test_shrink_on_a_language_model_clear_errors():
    model = tiny("llama")
    with pytest.raises(ValueError, match="prunes channels of CNNs; for a language model use one of lm-"):
        cm.shrink(model, windows(), 0.3, "taylor")
    with pytest.raises(ValueError, match="budget='flops'"):
        cm.shrink(model, windows(), 0.3, "lm-chita", budget="params")
    with pytest.raises(ValueError, match="Llama-style decoder blocks"):
        cm.shrink(tiny("gpt2"), windows(), 0.3, "lm-chita")


def test_throughput_measures_prefill_and_generation():
    from chita_minimal.network.language import throughput

    model = tiny("llama")
    speed = throughput(model, windows(2, 20).ids, new_tokens=4, prompt=8, repeats=1)
    assert speed["prefill_tokens_per_s"] > 0 and speed["generate_tokens_per_s"] > 0
    with pytest.raises(ValueError, match="ids must be"):
        throughput(model, windows(2, 4).ids, prompt=8)
