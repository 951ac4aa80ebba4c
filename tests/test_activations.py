"""The activation estimate against what autograd keeps and what is live on the CPU.

Saved tensors are counted with ``torch.autograd.graph.saved_tensors_hooks`` (unique storages,
parameters left out); the live bytes of a whole forward + backward with a dispatch mode that
follows every storage an operator returns until it is freed. Weight gradients are freed as
soon as they are made (``step_in_backward`` without an optimizer), so what is live beyond
the activations is at most one weight gradient.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memopt.optim.activations import (DecoderShape, estimate_activations,     # noqa: E402
                                      layer_saved_bytes)
from memopt.recipes.bench.update_peak import LiveBytes                        # noqa: E402

#: (hidden, intermediate, heads, kv_heads, layers, vocab, batch, seq_len): MHA and GQA, a
#: vocabulary large enough for the loss to dominate and one small enough for the layers to.
SHAPES = [(64, 160, 4, 4, 2, 1000, 2, 16), (64, 160, 4, 2, 3, 100, 2, 16),
          (96, 256, 6, 3, 2, 300, 3, 40), (128, 352, 4, 4, 2, 16, 4, 64),
          (128, 384, 4, 2, 2, 64, 3, 40)]
DTYPES = [torch.float32, torch.bfloat16]


def llama(shape, dtype, checkpointing, quantized=False):
    hidden, inter, heads, kv_heads, layers, vocab, _, _ = shape
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_attention_heads=heads, num_key_value_heads=kv_heads, num_hidden_layers=layers,
        tie_word_embeddings=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).to(dtype)
    if quantized:
        from memopt import quantize_weights
        quantize_weights(model)
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # transformers' rename notice
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def estimate(shape, dtype, checkpointing, quantized_numel=0):
    hidden, inter, heads, kv_heads, layers, vocab, batch, seq_len = shape
    return estimate_activations(
        DecoderShape(hidden, inter, heads, kv_heads, layers, vocab, hidden // heads),
        batch=batch, seq_len=seq_len, dtype=dtype, checkpointing=checkpointing,
        quantized_numel=quantized_numel)


def tokens(shape):
    vocab, batch, seq_len = shape[5:]
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(1))


def saved_bytes(model, ids) -> int:
    """Bytes of the unique storages autograd saves in a forward (parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(seen.values())


def live_peak(model, ids) -> int:
    """Peak live bytes of one forward + backward, each weight gradient freed once made."""
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
             for p in model.parameters()]
    exclude = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    with LiveBytes(exclude) as mode:
        model(input_ids=ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    return mode.peak


@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_saved_tensors_are_the_estimate(shape, dtype, checkpointing):
    est = estimate(shape, dtype, checkpointing)
    counted = saved_bytes(llama(shape, dtype, checkpointing), tokens(shape))
    expected = est.saved
    if checkpointing:    # cos/sin reach the recomputation through a closure, not saved tensors
        expected -= est.kept["rope_tables"]
    # exact but for the NLL loss's 4-byte total weight
    assert abs(expected - counted) <= 0.001 * counted, (expected, counted)


def test_one_layer_saves_what_the_estimate_lists():
    shape = (64, 160, 4, 2, 1, 100, 2, 16)
    one = saved_bytes(llama(shape, torch.bfloat16, False), tokens(shape))
    two_shape = shape[:4] + (2,) + shape[5:]
    two = saved_bytes(llama(two_shape, torch.bfloat16, False), tokens(two_shape))
    layer = layer_saved_bytes(DecoderShape(64, 160, 4, 2, 1, 100, 16), 32, 2, 16, 2)
    assert two - one == sum(layer.values())


@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_peak_is_within_ten_percent_of_the_live_bytes(shape, dtype, checkpointing):
    est = estimate(shape, dtype, checkpointing)
    model = llama(shape, dtype, checkpointing)
    measured = live_peak(model, tokens(shape))
    largest_gradient = max(p.numel() * p.element_size() for p in model.parameters())
    assert abs(est.peak - measured) <= 0.10 * measured, (est.peak, measured, est.moment)
    # the activations never exceed what is live; with one weight gradient they bound it
    assert est.peak <= 1.01 * measured
    assert measured <= 1.01 * (est.peak + largest_gradient)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointed"])
@pytest.mark.parametrize("shape", [(256, 640, 4, 4, 2, 16, 4, 128), (128, 384, 4, 2, 2, 64, 3, 40),
                                   (256, 640, 4, 4, 2, 512, 2, 128)], ids=str)
def test_int8_peak_is_bounded_by_activations_and_one_fp32_gradient(shape, checkpointing):
    hidden, inter = shape[:2]
    est = estimate(shape, torch.bfloat16, checkpointing, quantized_numel=hidden * inter)
    model = llama(shape, torch.bfloat16, checkpointing, quantized=True)
    measured = live_peak(model, tokens(shape))
    assert est.peak <= 1.01 * measured
    assert measured <= 1.01 * (est.peak + 4 * hidden * inter)


def test_checkpointing_keeps_one_input_per_layer():
    shape = DecoderShape(4096, 11008, 32, 32, 32, 32000, 128)
    full = estimate_activations(shape, batch=1, seq_len=2048, checkpointing=False)
    kept = estimate_activations(shape, batch=1, seq_len=2048, checkpointing=True)
    assert kept.kept["layer_inputs"] == 32 * 2 * 2048 * 4096
    assert full.kept["layers_saved"] == 32 * sum(full.layer.values())
    assert kept.peak < full.peak / 5


def test_loss_terms_follow_the_vocabulary_and_the_upcast():
    shape = DecoderShape(4096, 11008, 32, 32, 32, 32000, 128)
    bf16 = estimate_activations(shape, batch=2, seq_len=512)
    fp32 = estimate_activations(shape, batch=2, seq_len=512, dtype=torch.float32)
    tv = 2 * 512 * 32000
    assert bf16.moments["backward_loss"]["grad_logits_fp32"] == 4 * tv
    assert bf16.moments["forward_loss"]["logits"] == 2 * tv
    assert bf16.moments["forward_loss"]["logits_fp32"] == 4 * tv
    assert fp32.moments["forward_loss"]["logits_fp32"] == 0     # fp32 logits are not copied
    assert bf16.moment == "backward_loss"


def test_the_config_gives_the_shape():
    config = transformers.LlamaConfig(vocab_size=500, hidden_size=96, intermediate_size=200,
                                      num_attention_heads=6, num_key_value_heads=2,
                                      num_hidden_layers=3, tie_word_embeddings=True)
    assert DecoderShape.from_config(config) == DecoderShape(96, 200, 6, 2, 3, 500, 16, True)
    with pytest.raises(ValueError, match="intermediate_size"):
        DecoderShape.from_config(transformers.GPT2Config())


@pytest.mark.parametrize("name, value", [("batch", 0), ("seq_len", -1), ("batch", 1.5),
                                         ("seq_len", True)])
def test_bad_sizes_are_refused_by_name(name, value):
    sizes = {"batch": 1, "seq_len": 8, name: value}
    with pytest.raises(ValueError, match=name):
        estimate_activations(DecoderShape(64, 160, 4, 4, 2, 100, 16), **sizes)
