# fairscale's tensor-parallel linear layers (the model's parameter names and sharding), whose
# forward is the plain product when the layer is held whole, on one model-parallel process: the
# regions' autograd functions around the product (copy to, reduce from) are identities there, and
# cost more than the product itself for a decode step's small projections.
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers


class ColumnParallelLinear(fs_layers.ColumnParallelLinear):
    """fairscale's ColumnParallelLinear; held whole, F.linear alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_size_per_partition == self.out_features:
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)


class RowParallelLinear(fs_layers.RowParallelLinear):
    """fairscale's RowParallelLinear; held whole, F.linear alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size_per_partition == self.in_features:
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)


def project(x: torch.Tensor, *layers: nn.Module) -> Sequence[torch.Tensor]:
    """(layer(x) for layer in layers): the products of one input (a block's wq, wk and wv; w1 and
    w3), taken in one call where the first layer offers `joint(x, layers)` and it answers (the
    quantized layers' decode kernels round the activations once and read every weight in one
    parallel pass: llama.weights.quant_modules), else one layer at a time, as the original."""
    joint = getattr(layers[0], "joint", None)
    out = joint(x, layers) if joint is not None else None
    return out if out is not None else [layer(x) for layer in layers]
