"""FLOP counting for the benchmarks: torch.utils.flop_counter, taught the CPU flash-attention kernel.

torch's counter has formulas for the CUDA attention kernels but not for
aten._scaled_dot_product_flash_attention_for_cpu (and its backward), which SDPA picks on the
CPU (and on meta tensors) once q, k and v have a contiguous head dimension; uncounted, attention
would silently drop out of every CPU figure. The formulas are torch's own for the CUDA kernels.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

__all__ = ["FlopCounterMode"]

_aten = torch.ops.aten

if _aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:

    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_flash_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


if _aten._scaled_dot_product_flash_attention_for_cpu_backward not in flop_registry:

    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_flash_attention_backward(
        grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
    ) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
