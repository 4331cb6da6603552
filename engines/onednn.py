"""Linear layers on the CPU through oneDNN, with weights prepacked once."""

from __future__ import annotations

import torch


class OneDnnLinear(torch.nn.Module):
    """nn.Linear on the CPU through oneDNN, its weight reordered once into oneDNN's layout.

    torch's own CPU matmul (MKL) was about 3 times slower at the 1 to 16 rows of a decode
    step on the AMD EPYC this was measured on; oneDNN also gives each row the same result
    whatever the number of rows beside it, where MKL changed kernels below 16 rows."""

    # Rows the weight's layout is chosen for: oneDNN's results then match across 1 to 256 rows.
    ROWS_HINT = 16

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), self.ROWS_HINT)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Swap the model's float32 and bfloat16 linear layers for OneDnnLinear; how many were swapped.

    A layer whose weight another module shares (an output layer tied to the embeddings)
    keeps it: a reordered copy would double that memory."""
    if not torch.backends.mkldnn.is_available():
        return 0
    counts: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        counts[id(parameter)] = counts.get(id(parameter), 0) + 1
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear
        and child.weight.dtype in (torch.float32, torch.bfloat16)
        and counts[id(child.weight)] == 1
    ]
    for parent, name, child in swaps:
        setattr(parent, name, OneDnnLinear(child))
    return len(swaps)
