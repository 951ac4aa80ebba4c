"""estimate_memory with INT8 weights (memopt.quantize_weights) and with activations: each
term against first principles and against a quantized model on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memopt import quantize_weights                                            # noqa: E402
from memopt.optim import create_optimizer, state_bytes, step_in_backward     # noqa: E402
from memopt.optim.activations import estimate_activations                      # noqa: E402
from memopt.optim.memory import UPDATE_FP32_COPIES, estimate_memory            # noqa: E402

#: A small LLaMA with GQA and an intermediate size that is not a multiple of the group
#: (160 = 128 + 32: the down projection's rows have a ragged second group).
HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 160, 4, 2, 2, 100


def config(tie: bool = False):
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_hidden_layers=LAYERS,
        tie_word_embeddings=tie)


def linear_shapes() -> list[tuple[int, int]]:
    """(out, in) of each linear of one decoder layer: q, k, v, o, gate, up, down."""
    head_dim = HIDDEN // HEADS
    kv = KV_HEADS * head_dim
    return [(HIDDEN, HIDDEN), (kv, HIDDEN), (kv, HIDDEN), (HIDDEN, HIDDEN),
            (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]


def test_int8_weight_bytes_from_first_principles():
    quantized = LAYERS * sum(o * i + 4 * o * math.ceil(i / 128) + 16 for o, i in linear_shapes())
    bf16 = 2 * (2 * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN)   # embeddings, head, norms
    got = estimate_memory(config(), "adamw", weights="int8")
    assert got["weights"] == quantized + bf16
    # the down projection's 160 columns make two groups: one scale more per row than 160/128
    assert 4 * HIDDEN * 2 in [4 * o * math.ceil(i / 128) for o, i in linear_shapes()]


def test_int8_weight_bytes_are_what_quantize_weights_keeps():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config()).to(torch.bfloat16)
    quantize_weights(model)
    layers = [m for m in model.modules() if hasattr(m, "weight_codes")]
    held = sum(m.weight_codes.nbytes + m.weight_scales.nbytes + 16 for m in layers)
    held += sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if not n.endswith("proj.weight"))
    assert len(layers) == 7 * LAYERS
    assert estimate_memory(model, "adamw", weights="int8")["weights"] == held


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_int8_gradients_are_fp32_for_quantized_weights(tie):
    quantized = LAYERS * sum(o * i for o, i in linear_shapes())
    rest = (1 if tie else 2) * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN
    whole = estimate_memory(config(tie), "adamw", weights="int8")
    layered = estimate_memory(config(tie), "adamw", weights="int8", per_layer=True)
    assert whole["gradients"] == 4 * quantized + 2 * rest
    assert layered["gradients"] == max(4 * INTER * HIDDEN, 2 * VOCAB * HIDDEN)


@pytest.mark.parametrize("name, kwargs", [("adamw", {}), ("dct8bit", {"rank": 8}),
                                          ("galore", {"rank": 8}), ("trion8bit", {"rank": 8})])
def test_int8_state_is_what_the_optimizer_keeps_after_a_step(name, kwargs):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config()).to(torch.bfloat16)
    quantize_weights(model)
    opt = create_optimizer(name, model, lr=1e-3, **kwargs)
    handle = step_in_backward(model, opt)       # torch's own step refuses quantized weights
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    handle.remove()
    if opt.__module__.startswith("memopt"):
        measured = state_bytes(opt)
    else:                       # torch's optimizer: one per parameter inside step_in_backward
        measured = sum(v.numel() * v.element_size()
                       for one in set(handle.optimizers.values()) for s in one.state.values()
                       for v in s.values() if isinstance(v, torch.Tensor))
    assert estimate_memory(model, name, weights="int8", **kwargs)["optimizer_state"] == measured


def test_int8_state_of_a_memopt_optimizer_does_not_change():
    bf16 = estimate_memory(config(), "dct8bit", weight_dtype=torch.bfloat16, rank=8)
    int8 = estimate_memory(config(), "dct8bit", weights="int8", rank=8)
    assert int8["optimizer_state"] == bf16["optimizer_state"]
    assert int8["weights"] < bf16["weights"]


def test_update_temporaries_are_fp32_copies_of_the_largest_quantized_weight():
    got = estimate_memory(config(), "dct8bit", weights="int8", per_layer=True, rank=8)
    assert got["update_temporaries"] == UPDATE_FP32_COPIES * 4 * INTER * HIDDEN
    plain = estimate_memory(config(), "dct8bit", weight_dtype=torch.bfloat16, rank=8)
    assert plain["update_temporaries"] == 0


def test_without_seq_len_the_total_has_no_activations():
    got = estimate_memory(config(), "galore", rank=8)
    assert got["activations"] == 0
    assert got["total"] == got["weights"] + got["gradients"] + got["optimizer_state"]


@pytest.mark.parametrize("weights", [None, "int8"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_are_the_activation_estimate_and_in_the_total(weights, checkpointing):
    got = estimate_memory(config(), "dct8bit", weights=weights, weight_dtype=torch.bfloat16,
                          per_layer=True, batch=3, seq_len=40, checkpointing=checkpointing,
                          rank=8)
    expected = estimate_activations(config(), batch=3, seq_len=40, dtype=torch.bfloat16,
                                    checkpointing=checkpointing,
                                    quantized_numel=INTER * HIDDEN if weights else 0)
    assert got["activations"] == expected.peak > 0
    assert got["total"] == sum(got[k] for k in ("weights", "gradients", "optimizer_state",
                                                "activations", "update_temporaries"))


def test_activations_of_a_module_read_its_config():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config())
    assert estimate_memory(model, "adamw", seq_len=32)["activations"] == \
        estimate_memory(config(), "adamw", seq_len=32)["activations"]
    with pytest.raises(ValueError, match="config"):
        estimate_memory(torch.nn.Linear(4, 4), "adamw", seq_len=32)


@pytest.mark.parametrize("kwargs, match", [({"weights": "int4"}, "weights"),
                                           ({"weights": "int8", "weight_group_size": 0},
                                            "weight_group_size")])
def test_bad_weight_format_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_memory(config(), "adamw", **kwargs)


def test_int8_7b_saves_the_weights_bytes_and_the_model_is_untouched():
    config7b = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096,
                                        intermediate_size=11008, num_hidden_layers=32,
                                        num_attention_heads=32, tie_word_embeddings=False)
    int8 = estimate_memory(config7b, "dct8bit", weights="int8", per_layer=True, seq_len=256,
                           rank=1024)
    bf16 = estimate_memory(config7b, "dct8bit", weight_dtype=torch.bfloat16, per_layer=True,
                           seq_len=256, rank=1024)
    # 1 byte per linear weight + 4 / 128 for its scales; embeddings and head in bf16
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert int8["weights"] == pytest.approx(linear * (1 + 4 / 128) + 2 * 2 * 32000 * 4096,
                                            rel=1e-4)
    # INT8 saves about half of the bf16 weights (6.3 GB) and pays fp32 temporaries back
    saved = bf16["weights"] - int8["weights"]
    assert saved > 6e9
    assert bf16["total"] - saved < int8["total"] < bf16["total"] - saved + 1e9
