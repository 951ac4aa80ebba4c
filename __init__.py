"""memopt: memory-efficient PyTorch optimizers (``memopt.optim``), the projector layer they
share (``memopt.projections``) and the recipes that measure them (``memopt.recipes``).

``memopt.quantize_weights(model, bits=8)`` keeps a model's linear weights in INT8 and trains
them with stochastic rounding (``memopt.optim.quantized_weights``).
"""

from .optim.quantize_model import quantize_weights
from .optim.quantized_weights import QuantizedLinear

__all__ = ["QuantizedLinear", "quantize_weights"]
