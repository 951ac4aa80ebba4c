"""Activation memory of one training step of a LLaMA-style decoder, before training.

What autograd keeps for the backward pass of a transformers ``LlamaForCausalLM`` (sdpa
attention, the loss computed by the model from ``labels``), tensor by tensor, and the
transients that sit on top of it at the step's three busiest moments: the loss in the
forward, the loss's backward, and the backward of the top decoder layer. With non-reentrant
activation checkpointing (``gradient_checkpointing_enable(use_reentrant=False)``) each layer
keeps only its input and, in the backward, one layer's activations are recomputed and live
at once. Every term is named, so a measured difference can be traced to one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FP32 = 4        # bytes: RMSNorm's statistics, the attention's logsumexp, the loss's logits
INDEX = 8       # bytes of an int64 token id
#: fp32 tensors of the hidden size live at once in RMSNorm's backward (autograd's backward of
#: x.float(), x^2, mean, rsqrt and the two products; counted on the CPU with a dispatch mode).
NORM_BACKWARD_FP32 = 5


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a LLaMA-style decoder that its activations depend on."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    head_dim: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Any) -> "DecoderShape":
        """The shape of a transformers config (``LlamaConfig`` or one with its fields)."""
        fields = {"hidden": "hidden_size", "intermediate": "intermediate_size",
                  "heads": "num_attention_heads", "layers": "num_hidden_layers",
                  "vocab": "vocab_size"}
        missing = [key for key in fields.values() if getattr(config, key, None) is None]
        if missing:
            raise ValueError(f"activations: the config has no {', '.join(missing)}; a "
                             "LLaMA-style decoder config (LlamaConfig) is needed")
        values = {name: int(getattr(config, key)) for name, key in fields.items()}
        kv_heads = getattr(config, "num_key_value_heads", None) or values["heads"]
        head_dim = getattr(config, "head_dim", None) or values["hidden"] // values["heads"]
        return cls(kv_heads=int(kv_heads), head_dim=int(head_dim),
                   tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   **values)


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes of activations of one forward + backward, term by term.

    ``layer`` is what one decoder layer saves for its backward (recomputed in the backward
    under checkpointing); ``kept`` what the whole step holds at the end of the forward;
    ``moments`` the bytes live at each busy moment, term by term; ``peak`` the largest
    moment's total and ``moment`` its name.
    """

    layer: dict[str, int]
    kept: dict[str, int]
    moments: dict[str, dict[str, int]]
    peak: int
    moment: str

    @property
    def saved(self) -> int:
        """Bytes autograd holds at the end of the forward (what saved-tensor hooks see)."""
        return sum(self.kept.values())


def layer_saved_bytes(shape: DecoderShape, tokens: int, batch: int, seq_len: int,
                      element: int) -> dict[str, int]:
    """What autograd saves in one ``LlamaDecoderLayer`` for ``tokens`` = batch x seq_len.

    Read from transformers' forward (``modeling_llama.py``), E = ``element`` bytes:
    - norm_inputs_fp32: each RMSNorm's input upcast to fp32, saved by x^2 and x rsqrt (for
      an fp32 model the input itself): 2 x 4 T h.
    - norm_rsqrt: rsqrt(mean(x^2) + eps), one fp32 per token per norm: 2 x 4 T.
    - norm_normalized: x rsqrt cast back to E bytes, saved for the norm weight's gradient.
    - norm_outputs: w x rsqrt, saved by q/k/v (one tensor) and by gate/up (one tensor).
    - attention_query, attention_key_value: the rotated query and key and the value, saved by
      sdpa (RoPE saves only its cos/sin tables, which need no gradient); with sdpa's GQA
      the key and value keep their kv_heads.
    - attention_output: sdpa's output, which o_proj saves too (the same storage).
    - attention_logsumexp: fp32, one per head per token (flash / memory-efficient kernels).
    - mlp_projections: gate and up outputs (SiLU's input, the product's right factor).
    - mlp_products: SiLU(gate) (the product's left factor) and SiLU(gate) up (down's input).
    """
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return {
        "norm_inputs_fp32": 2 * FP32 * tokens * shape.hidden,
        "norm_rsqrt": 2 * FP32 * tokens,
        "norm_normalized": 2 * element * tokens * shape.hidden,
        "norm_outputs": 2 * element * tokens * shape.hidden,
        "attention_query": element * tokens * q_dim,
        "attention_key_value": 2 * element * tokens * kv_dim,
        "attention_output": element * tokens * q_dim,
        "attention_logsumexp": FP32 * batch * shape.heads * seq_len,
        "mlp_projections": 2 * element * tokens * shape.intermediate,
        "mlp_products": 2 * element * tokens * shape.intermediate,
    }


def estimate_activations(config_or_shape: Any, *, batch: int, seq_len: int,
                         dtype: torch.dtype = torch.bfloat16, checkpointing: bool = True,
                         quantized_numel: int = 0) -> ActivationEstimate:
    """Activation bytes of one forward + backward of a LLaMA-style causal LM.

    peak = max over the busiest moments of the bytes live then (T = batch x seq_len tokens,
    E = bytes of ``dtype``, V = vocabulary, h = hidden, I = intermediate, L = layers):

    - forward_loss, while log-softmax runs: kept + logits (E T V, in the model's output)
      + their fp32 upcast in the loss (logits_fp32, 4 T V; none for fp32 logits).
    - backward_loss, while log-softmax's backward runs: kept + grad_log_softmax (4 T V,
      dense, from the NLL loss) + grad_logits_fp32 (4 T V).
    - backward_final_norm, in the final RMSNorm's backward (it matters for small
      vocabularies): kept without the log-softmax and the norm's E-byte tensors, plus
      norm_backward_fp32 (``NORM_BACKWARD_FP32`` fp32 tensors of T x h).
    - backward_layer, the top layer's MLP backward: the layers' inputs (layer_inputs,
      checkpointing: L x E T h) or saved tensors (layers_saved, L x ``layer_saved_bytes``),
      the layer being differentiated (layer_recomputed, checkpointing: its saved tensors
      again), grad_hidden (E T h, the gradient entering the layer) and grad_mlp (2 E T I:
      the gradients of SiLU(gate) up, SiLU(gate) and up live at once, the product freed).
    - With INT8 weights (``quantized_numel``: elements of the largest quantized weight),
      two more moments of that layer: backward_layer_dequantize, while its largest weight
      is dequantized for the input gradient (dequantized_weight, E numel: the codes cast
      to E bytes, scaled in place), and backward_layer_fp32_grad, while
      its fp32 weight gradient is formed (grad_product, E T I, and grad_fp32_inputs,
      4 T (h + I): the fp32 casts of the output gradient and of the input).

    kept (the end of the forward) = layer_inputs or layers_saved + final_norm (as one
    layer's norm) + log_softmax (4 T V, fp32) + token_ids (input ids saved by the
    embedding, shifted labels by the loss: 2 x 8 T) + rope_tables (cos and sin, 2 E s d).

    Weight gradients are not activations (``estimate_memory`` counts them). The loss
    upcast assumes the caller drops the model's output before backward (``loss =
    model(...).loss``); one that keeps it also keeps E T V of logits through the backward.
    Tied embeddings change nothing here. Sizes of kernels' workspaces (cuBLAS, the flash
    attention backward's fp32 accumulators) are not counted.

    Args:
        config_or_shape: a transformers config (LLaMA fields) or a :class:`DecoderShape`.
        batch, seq_len: sequences per step and tokens per sequence (>= 1).
        dtype: the compute dtype of the activations (the weights' for a plain model; bf16
            for INT8 weights computed in bf16).
        checkpointing: non-reentrant activation checkpointing of every decoder layer.
        quantized_numel: elements of the largest INT8-quantized weight (0: none).
    """
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"activations: {name} must be an integer >= 1, got {value!r}")
    shape = (config_or_shape if isinstance(config_or_shape, DecoderShape)
             else DecoderShape.from_config(config_or_shape))
    element = torch.empty((), dtype=dtype, device="meta").element_size()
    tokens = batch * seq_len
    h, inter, vocab = shape.hidden, shape.intermediate, shape.vocab
    layer = layer_saved_bytes(shape, tokens, batch, seq_len, element)
    norm = {k: layer[k] // 2 for k in ("norm_inputs_fp32", "norm_rsqrt", "norm_normalized",
                                        "norm_outputs")}
    across = ({"layer_inputs": shape.layers * element * tokens * h} if checkpointing
              else {"layers_saved": shape.layers * sum(layer.values())})
    common = {**across, "token_ids": 2 * INDEX * tokens,
              "rope_tables": 2 * element * seq_len * shape.head_dim}
    kept = {**common, "final_norm": sum(norm.values()), "log_softmax": FP32 * tokens * vocab}
    upcast = 0 if element == FP32 else FP32 * tokens * vocab
    recomputed = sum(layer.values()) if checkpointing else 0
    if checkpointing and element == FP32:        # the first norm's "upcast" is the input kept
        recomputed -= FP32 * tokens * h
    layer_moment = {**common, "layer_recomputed": recomputed,
                    "grad_hidden": element * tokens * h}
    moments = {
        "forward_loss": {**kept, "logits": element * tokens * vocab, "logits_fp32": upcast},
        "backward_loss": {**kept, "grad_log_softmax": FP32 * tokens * vocab,
                          "grad_logits_fp32": FP32 * tokens * vocab},
        "backward_final_norm": {**kept, "log_softmax": 0,
                                "final_norm": norm["norm_inputs_fp32"] + norm["norm_rsqrt"],
                                "norm_backward_fp32": NORM_BACKWARD_FP32 * FP32 * tokens * h},
        "backward_layer": {**layer_moment, "grad_mlp": 2 * element * tokens * inter},
    }
    if quantized_numel:
        moments["backward_layer_dequantize"] = {
            **layer_moment, "dequantized_weight": element * quantized_numel}
        moments["backward_layer_fp32_grad"] = {
            **layer_moment, "grad_product": element * tokens * inter,
            "grad_fp32_inputs": FP32 * tokens * (h + inter)}
    totals = {name: sum(terms.values()) for name, terms in moments.items()}
    moment = max(totals, key=totals.__getitem__)
    return ActivationEstimate(layer=layer, kept=kept, moments=moments, peak=totals[moment],
                              moment=moment)


__all__ = ["ActivationEstimate", "DecoderShape", "estimate_activations", "layer_saved_bytes"]
