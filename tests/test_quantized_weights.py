"""memopt.quantize_weights: INT8 / bf16 weights trained with stochastic rounding.

Round trips of the codes, the expectation of stochastic rounding, forward and backward
against a float64 reference, training, per-layer updates, bit-exact resume, the state dict,
and the refusals.
"""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import memopt
from memopt.optim import DCTAdamW, GaLoreAdamW, Muon, Trion, step_in_backward
from memopt.optim.quantized_weights import (QuantizedLinear, QuantizedWeight, materialized)
from memopt.optim.stochastic_rounding import (bf16_round_, generator, int8_dequantize,
                                              int8_quantize_)


#: CUDA where there is one (.ci/gpu runs this file on a GPU machine)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def int8_codes(w, group_size, rounding="nearest", seed=0, count=0):
    rows, cols = w.shape
    codes = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    scales = torch.empty(rows, -(-cols // group_size), device=w.device)
    g = generator(w.device, seed, count) if rounding == "stochastic" else None
    int8_quantize_(w, codes, scales, group_size, rounding, g)
    return codes, scales


# ---------------------------------------------------------------- the codes
@pytest.mark.parametrize("shape,group", [((7, 256), 128), ((5, 200), 64), ((3, 50), 128),
                                         ((4, 129), 128)])
def test_int8_round_trip_within_half_a_step(shape, group):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[0]).unsqueeze(1)
    codes, scales = int8_codes(w, group)
    assert codes.abs().max() <= 127
    back = int8_dequantize(codes, scales, group, torch.float64)
    step = scales.double().repeat_interleave(group, 1)[:, :shape[1]]
    assert ((back - w.double()).abs() <= step / 2 * (1 + 1e-6) + 1e-12).all()
    # the scale is the group's absmax / 127: the largest element is represented exactly
    padded = torch.nn.functional.pad(w, (0, scales.shape[1] * group - shape[1]))
    absmax = padded.abs().view(shape[0], -1, group).amax(-1)
    torch.testing.assert_close(scales, absmax / 127, rtol=0, atol=0)
    # codes on the grid come back bit for bit
    again, scales2 = int8_codes(back.float(), group)
    assert torch.equal(again, codes)


def test_int8_zero_group_and_exact_values():
    w = torch.zeros(2, 256)
    w[1, :128] = torch.arange(-64, 64) / 64.0
    codes, scales = int8_codes(w, 128)
    assert scales[0].eq(0).all() and codes[0].eq(0).all()
    assert int8_dequantize(codes, scales, 128, torch.float32)[0].eq(0).all()


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_bf16_rounding_brackets_the_value(rounding):
    torch.manual_seed(1)
    w = torch.randn(64, 96) * 3
    out = torch.empty(64, 96, dtype=torch.bfloat16)
    bf16_round_(w, out, rounding, generator(w.device, 0, 0))
    down = w.to(torch.bfloat16)   # nearest
    if rounding == "nearest":
        assert torch.equal(out, down)
        return
    lo = torch.where(w.abs() >= down.float().abs(), down.float(), 0) # bracket by truncation
    trunc = (w.view(torch.int32) & -(1 << 16)).view(torch.float32)
    up = torch.nextafter(trunc.to(torch.bfloat16), torch.sign(w).to(torch.bfloat16) * torch.inf)
    ok = (out.float() == trunc) | (out == up)
    assert ok.all() and lo.shape == w.shape


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_is_unbiased_and_nearest_is_not(device):
    """E[SR(w)] = w: the mean of many roundings converges to w at the 1/sqrt(n) rate, for
    INT8 and bf16; rounding to nearest keeps a bias of up to half a step."""
    torch.manual_seed(2)
    w = torch.randn(4, 128).clamp(-0.99, 0.99).to(device)
    w[:, 0] = 1.0                          # fixes each row's scale at 1/127
    step = 1 / 127
    n = 2000
    total = torch.zeros_like(w, dtype=torch.float64)  # (on w's device)
    for count in range(n):
        codes, scales = int8_codes(w, 128, "stochastic", seed=5, count=count)
        total += int8_dequantize(codes, scales, 128, torch.float64)
    mean = total / n
    # each draw's error is in (-step, step) with variance <= step^2 / 4
    bound = 5 * (step / 2) / n ** 0.5
    assert (mean - w.double()).abs().max() < bound
    near = int8_dequantize(*int8_codes(w, 128), 128, torch.float64)
    assert (near - w.double()).abs().max() > 4 * bound
    out = torch.empty(4, 128, dtype=torch.bfloat16, device=device)
    tot16 = torch.zeros_like(total)
    for count in range(n):
        bf16_round_(w, out, "stochastic", generator(w.device, 5, count))
        tot16 += out.double()
    ulp = (w.abs().double() * 2 ** -7)
    assert ((tot16 / n - w.double()).abs() <= 5 * ulp / 2 / n ** 0.5 + 1e-12).all()


def test_small_updates_survive_stochastic_rounding_only():
    """Updates of a tenth of a step: nearest rounding drops every one, stochastic rounding
    accumulates them on average (the point of it; Q-GaLore)."""
    torch.manual_seed(3)
    results = {}
    for rounding in ("stochastic", "nearest"):
        layer = QuantizedLinear(nn.Linear(256, 64), 8, rounding=rounding)
        w0 = layer.dequantize(torch.float64)
        step = layer.weight_scales.double().repeat_interleave(128, 1)
        for _ in range(200):
            with materialized([layer.weight]):
                layer.weight.data.add_((step / 10).float())  # (scales move with absmax too)
        results[rounding] = ((layer.dequantize(torch.float64) - w0) / step).mean().item()
    assert results["nearest"] < 0.5          # only what the growing absmax stretches
    assert abs(results["stochastic"] - 20) < 2.5   # 200 x 0.1 steps, on average


# ------------------------------------------------------------- the layer
def test_forward_and_backward_match_float64_reference():
    torch.manual_seed(4)
    linear = nn.Linear(200, 48)
    layer = QuantizedLinear(copy.deepcopy(linear), 8, group_size=64)
    ref = nn.Linear(200, 48).double()
    with torch.no_grad():
        ref.weight.copy_(layer.dequantize(torch.float64))
        ref.bias.copy_(linear.bias)
    x = torch.randn(3, 5, 200, requires_grad=True)
    xr = x.detach().double().requires_grad_()
    y, yr = layer(x), ref(xr)
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g.double())
    assert layer.weight.grad.dtype == torch.float32
    assert layer.weight.grad.shape == (48, 200)
    torch.testing.assert_close(layer.weight.grad.double(), ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad.double(), ref.bias.grad, rtol=1e-5, atol=1e-5)


def tiny_llama(tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160,
                      num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def test_no_full_precision_copy_remains():
    model = tiny_llama()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    memopt.quantize_weights(model)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == len(linears) - 1           # all but the head
    assert not isinstance(model.lm_head, QuantizedLinear)
    for layer in quantized:
        assert isinstance(layer.weight, QuantizedWeight)
        assert layer.weight.untyped_storage().nbytes() <= 4
        assert layer.weight.shape == layer.weight_codes.shape
        rows, cols = layer.weight.shape
        assert layer.weight_codes.nbytes == rows * cols            # 1 byte a weight
        assert layer.weight_scales.nbytes == 4 * rows * -(-cols // 128)   # + 4 per group
        assert torch.isnan(layer.weight).all()           # no stale values to read


def test_model_forward_matches_dequantized_weights():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 24))
    reference = copy.deepcopy(model)
    memopt.quantize_weights(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                reference.get_submodule(name).weight.copy_(module.dequantize())
        a = model(input_ids=ids).logits
        b = reference(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 16])
def test_training_with_quantized_weights_lowers_the_loss(bits):
    model = tiny_llama()
    memopt.quantize_weights(model, bits=bits)
    opt = GaLoreAdamW(model, lr=3e-3, rank=16, update_proj_gap=20)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    first = None
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else loss.item()
    assert loss.item() < first - 2.0         # memorising one batch: 4.9 -> under 2.9


def run_steps(model, n, per_layer, make_opt, ids):
    opt = make_opt(model)
    handle = step_in_backward(model, opt) if per_layer else None
    for _ in range(n):
        model(input_ids=ids, labels=ids).loss.backward()
        if handle is None:
            opt.step()
            opt.zero_grad()
    return opt


@pytest.mark.parametrize("make_opt", [
    lambda m: DCTAdamW(m, lr=3e-3, rank=16, update_proj_gap=3),
    lambda m: Trion(m, lr=0.02, rank=16),
    lambda m: Muon(m, lr=0.02),
], ids=["dct", "trion", "muon"])
def test_per_layer_updates_equal_the_whole_step(make_opt):
    """The engine updates quantized weights one at a time in both modes, each from its own
    rounding stream: per-layer and ordinary steps give the same codes, bit for bit."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    codes = []
    for per_layer in (False, True):
        model = tiny_llama()
        memopt.quantize_weights(model)
        run_steps(model, 5, per_layer, make_opt, ids)
        codes.append({k: v for k, v in model.state_dict().items() if "codes" in k})
    assert codes[0].keys() == codes[1].keys()
    for key in codes[0]:
        assert torch.equal(codes[0][key], codes[1][key]), key


def test_any_torch_optimizer_through_step_in_backward_and_refused_without():
    model = tiny_llama()
    memopt.quantize_weights(model)
    ids = torch.randint(0, 128, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="cannot update a quantized weight"):
        opt.step()
    assert not opt.state                     # refused before anything changed
    opt.zero_grad()
    before = model.model.layers[0].mlp.up_proj.dequantize().clone()
    step_in_backward(model, opt)
    model(input_ids=ids, labels=ids).loss.backward()
    assert (model.model.layers[0].mlp.up_proj.dequantize() - before).abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_layer", [False, True])
def test_resume_is_bit_exact(per_layer, device, tmp_path):
    """Train 4 steps, save model + optimizer, load both (weights_only) into a freshly
    quantized model, train 4 more: the codes, scales and rounding counts equal 8 uninterrupted
    steps (a DCT basis refresh every 3 steps falls inside both halves)."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2)).to(device)

    def make(model):
        return DCTAdamW(model, lr=3e-3, rank=16, update_proj_gap=3)

    def fresh():
        model = tiny_llama().to(device)
        memopt.quantize_weights(model, seed=7)
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return model

    straight = fresh()
    run_steps(straight, 8, per_layer, make, ids)
    half = fresh()
    opt = run_steps(half, 4, per_layer, make, ids)
    torch.save({"model": half.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    resumed = fresh()
    resumed.load_state_dict(saved["model"])
    opt = make(resumed)
    opt.load_state_dict(saved["opt"])
    handle = step_in_backward(resumed, opt) if per_layer else None
    for _ in range(4):
        resumed(input_ids=ids, labels=ids).loss.backward()
        if handle is None:
            opt.step()
            opt.zero_grad()
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert any(k.endswith("_extra_state") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert int(a["model.layers.0.mlp.up_proj._extra_state"][1]) == 8     # one rounding a step


def test_state_dict_holds_codes_not_weights_and_loads_a_full_precision_checkpoint():
    model = tiny_llama()
    full = copy.deepcopy(model.state_dict())
    memopt.quantize_weights(model)
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" not in sd
    assert sd["model.layers.0.self_attn.q_proj.weight_codes"].dtype == torch.int8
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True).keys() == sd.keys()
    # a pretrained (full-precision) state dict is quantized on load: same codes as quantizing
    other = tiny_llama(seed=9)
    memopt.quantize_weights(other)
    other.load_state_dict(full)
    for key, value in sd.items():
        if "codes" in key or "scales" in key:
            assert torch.equal(other.state_dict()[key], value), key


def test_load_refuses_codes_of_another_width():
    a, b = tiny_llama(), tiny_llama()
    memopt.quantize_weights(a, bits=8)
    memopt.quantize_weights(b, bits=16)
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(RuntimeError, match="int8 codes.*bits=16"):
        b.load_state_dict(a.state_dict())
    layer = b.model.layers[0].mlp.up_proj
    assert torch.equal(layer.weight_codes, before["model.layers.0.mlp.up_proj.weight_codes"])
    with pytest.raises(ValueError, match="rounding state"):
        layer.set_extra_state(torch.tensor([1.0, 2.0]))


def test_a_failed_step_leaves_codes_and_state_unchanged():
    model = tiny_llama()
    memopt.quantize_weights(model)
    opt = GaLoreAdamW(model, lr=3e-3, rank=16)
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    before = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    model(input_ids=ids, labels=ids).loss.backward()
    model.model.layers[1].mlp.down_proj.weight.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="down_proj"):
        opt.step()
    after = model.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert torch.isnan(model.model.layers[1].mlp.down_proj.weight).all()   # not left materialized
    assert str(opt.state_dict()) == str(state)


def test_moves_and_casts_keep_the_codes():
    model = tiny_llama()
    memopt.quantize_weights(model)
    layer = model.model.layers[0].mlp.up_proj
    codes = layer.weight_codes.clone()
    scales = layer.weight_scales.clone()
    model.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32 and layer.weight_scales.dtype == torch.float32
    assert torch.equal(layer.weight_codes, codes) and torch.equal(layer.weight_scales, scales)
    ids = torch.randint(0, 128, (2, 16))
    assert model(input_ids=ids).logits.dtype == torch.bfloat16
    clone = copy.deepcopy(model)
    twin = clone.model.layers[0].mlp.up_proj
    assert twin.weight.layer is twin and twin.weight_codes.data_ptr() != codes.data_ptr()
    assert torch.equal(twin.dequantize(), layer.dequantize())


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("bits", [4, 32, "8", 8.0])
def test_unsupported_bits_are_refused_by_name(bits):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"bits=.* is not supported.*8 \(INT8.*16 \(bf16\)"):
        memopt.quantize_weights(model, bits=bits)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


@pytest.mark.parametrize("kwargs,match", [({"group_size": 0}, "group_size"),
                                          ({"group_size": True}, "group_size"),
                                          ({"rounding": "up"}, "rounding"),
                                          ({"modules": ["nope"]}, "'nope'"),
                                          ({"modules": "model"}, "string")])
def test_bad_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        memopt.quantize_weights(tiny_llama(), **kwargs)


def test_modules_that_cannot_be_quantized_are_listed_in_one_warning():
    from transformers.pytorch_utils import Conv1D

    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(8, 8), Conv1D(8, 8), Custom(8, 8), nn.Embedding(4, 8),
                          nn.Linear(8, 8), nn.Linear(8, 8))
    model[4].weight = model[0].weight                       # tied
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        memopt.quantize_weights(model, modules=lambda n, m: n != "")
    messages = [str(w.message) for w in caught if "quantize_weights" in str(w.message)]
    assert len(messages) == 1
    text = messages[0]
    for part in ("0 (its weight is shared with 4)", "1 (Conv1D, not", "2 (Custom has its own",
                 "3 (Embedding, not", "4 (its weight is shared with 0)"):
        assert part in text, text
    assert [isinstance(m, QuantizedLinear) for m in model] == [False] * 5 + [True]


def test_nothing_to_quantize_is_an_error():
    with pytest.raises(ValueError, match="no module could be quantized"):
        memopt.quantize_weights(nn.Sequential(nn.ReLU()))


def test_a_tied_head_stays_and_is_listed_when_asked():
    model = tiny_llama(tie=True)
    with pytest.warns(UserWarning, match="lm_head .*shared with model.embed_tokens"):
        memopt.quantize_weights(model, modules=lambda n, m: isinstance(m, nn.Linear))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_materialize_in_turns_bounds_the_fp32_bytes_held(monkeypatch):
    """The engine materializes at most MATERIALIZE_BYTES of quantized weights at once (one
    weight at least), keeping the other parameters in their own batch."""
    from memopt.optim import quantized_weights as qw
    model = tiny_llama()
    memopt.quantize_weights(model)
    params = list(model.parameters())
    quantized = [p for p in params if isinstance(p, QuantizedWeight)]
    group = {"name": "all"}
    turns = qw.materialize_in_turns([(group, params)], budget=64 * 160 * 4 * 2)
    plain, rest = turns[0][1], turns[1:]
    assert plain == [p for p in params if not isinstance(p, QuantizedWeight)]
    assert [p for _, t in rest for p in t] == quantized
    assert all(sum(p.numel() * 4 for p in t) <= 64 * 160 * 4 * 2 for _, t in rest)
    assert len(qw.materialize_in_turns([(group, params)], budget=1)) == 1 + len(quantized)
    assert len(qw.materialize_in_turns([(group, params)], budget=2**40)) == 2
    # and the updates do not depend on how the weights are batched
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    codes = []
    for budget in (2**40, 1):
        monkeypatch.setattr(qw, "MATERIALIZE_BYTES", budget)
        model = tiny_llama()
        memopt.quantize_weights(model)
        run_steps(model, 3, False, lambda m: Muon(m, lr=0.02), ids)
        codes.append(model.state_dict())
    for key in codes[0]:
        assert torch.equal(codes[0][key], codes[1][key]), key
