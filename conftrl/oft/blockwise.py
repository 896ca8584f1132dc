"""Products with a block-diagonal R = blockdiag(Q_1 .. Q_r) that never build R itself.

A stack of blocks has shape (r, b, b), or (1, b, b) when one block is shared by all r;
r is then the rotated size d divided by b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate_rows(rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """rows R over the last dimension: each row's i-th slice of width b times Q_i."""
    shape = rows.shape
    b = blocks.shape[-1]
    rows = rows.reshape(-1, shape[-1] // b, b)
    if blocks.shape[0] == 1:
        rotated = rows @ blocks[0]
    else:
        # A strided (r, n, b) view goes to the batched matmul as it is; einsum would copy it
        # first (8-28 % slower, forward + backward, at SD 1.5's shapes on a CPU).
        rotated = (rows.transpose(0, 1) @ blocks).transpose(0, 1)
    return rotated.reshape(shape)


def rotate_columns(columns: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """R^T applied to every column of (batch, d, positions), as unfold lays out conv patches."""
    batch, d, positions = columns.shape
    b = blocks.shape[-1]
    stacked = columns.view(batch, d // b, b, positions)
    return (blocks.transpose(1, 2) @ stacked).view(batch, d, positions)  # a shared block broadcasts


def rotate_weight(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """W R^T for a flattened (out, d) weight, one block column at a time."""
    out, d = weight.shape
    b = blocks.shape[-1]
    columns = weight.reshape(out, d // b, b)
    if blocks.shape[0] == 1:
        rotated = columns @ blocks[0].T
    else:
        rotated = torch.einsum("orb,rcb->orc", columns, blocks)
    return rotated.reshape(out, d)


def block_gradient(rows: torch.Tensor, grad_rotated: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """dL/dQ for rotated = rows R: per block, the sum over rows of the slices rows_i^T grad_i."""
    b = blocks.shape[-1]
    rows = rows.reshape(-1, rows.shape[-1] // b, b)
    grad_rotated = grad_rotated.reshape(rows.shape)
    if blocks.shape[0] == 1:
        return (rows.reshape(-1, b).T @ grad_rotated.reshape(-1, b)).unsqueeze(0)
    return rows.permute(1, 2, 0) @ grad_rotated.transpose(0, 1)


class RotatedWeightLinear(torch.autograd.Function):
    """F.linear(x, W R^T, bias) with the input-centric form's backward.

    Neither plain form is cheapest when the layer sees more tokens N than it has outputs:
    rotating x costs N*d*b, rotating W only out*d*b, but autograd through W R^T then needs W R^T's
    full gradient (N*d*out) to reach R. This forward multiplies by W R^T; the backward takes
    g W = dL/d(x R) (what the frozen layer's input gradient costs anyway) and from it both
    dL/dx and dL/dQ (2*N*d*b), exactly as autograd through x R would, without forming x R.
    """

    @staticmethod
    def forward(ctx, x, blocks, weight, bias):
        out = F.linear(x, rotate_weight(weight, blocks.to(weight.dtype)), bias)
        # Kept in the dtype the product ran in (autocast's), as the input-centric form keeps it.
        ctx.save_for_backward(x.to(out.dtype), blocks, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, blocks, weight = ctx.saved_tensors
        blocks = blocks.to(grad.dtype)
        grad_rotated = grad @ weight.to(grad.dtype)
        grad_x = rotate_rows(grad_rotated, blocks.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_blocks = block_gradient(x, grad_rotated, blocks) if ctx.needs_input_grad[1] else None
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:  # a base weight left trainable: dL/dW = (g^T x) R
            grad_weight = rotate_rows(grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]), blocks)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_blocks, grad_weight, grad_bias
