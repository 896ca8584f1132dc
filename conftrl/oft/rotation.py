"""The block-diagonal orthogonal matrix of one adapter of one layer.

Storage follows PEFT's current format so adapters move between the two libraries unchanged:
a parameter `weight` of shape (n, b(b-1)/2) holding, per stored block, the strict upper
triangle (row-major) of a skew-symmetric S = U - U^T. Each block is the Cayley transform
Q = (I - S)(I + S)^-1, exactly or by a truncated Neumann series.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from conftrl.oft.blockwise import rotate_weight
from conftrl.oft.recompute import blocks_of

# Batched LU (`linalg.solve`/`inv`) on CPU is unreliable for matrices wider than ~150 with more
# than one thread (pytorch#142815: wrong pivots, garbage or hangs). `solve_blocks` (unmerge)
# solves wider CPU blocks one at a time, which is exact.
_CPU_BATCHED_SOLVE_MAX_WIDTH = 128
# On CPU, LAPACK's LU solve runs at a fraction of its matmul speed: 4 blocks of 320 took 21 ms to
# solve where one product of them took 4 ms (one thread, benchmarks/oft_layers.py's 1280-wide
# Linear). Cayley blocks wider than this are therefore inverted by halving, the same b^3 work
# done by matmuls, down to batched inverses of at most this width.
_CPU_HALVING_MIN_WIDTH = 64
_COFT_TOLERANCE = 1e-6


def solve_blocks(lhs: torch.Tensor, rhs: torch.Tensor, left: bool = True) -> torch.Tensor:
    """Solve lhs_i X_i = rhs_i (or X_i lhs_i = rhs_i) for a stack of blocks, safely on CPU."""
    if lhs.device.type == "cpu" and lhs.shape[-1] > _CPU_BATCHED_SOLVE_MAX_WIDTH:
        return torch.stack([torch.linalg.solve(a, b, left=left) for a, b in zip(lhs, rhs)])
    return torch.linalg.solve(lhs, rhs, left=left)


def invert_by_halving(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of a stack of I + S blocks (S skew-symmetric) by 2x2 block elimination.

    No pivoting is needed for these matrices: every leading block is again identity plus skew
    and every Schur complement has a positive definite symmetric part, so all are invertible,
    and since the singular values of I + S are at least 1 no inverse block exceeds norm 1.
    """
    width = matrix.shape[-1]
    if width <= _CPU_HALVING_MIN_WIDTH:
        return torch.linalg.inv(matrix)
    half = width // 2
    top_left, top_right = matrix[:, :half, :half], matrix[:, :half, half:]
    bottom_left, bottom_right = matrix[:, half:, :half], matrix[:, half:, half:]
    top_left_inverse = invert_by_halving(top_left)
    right_factor = top_left_inverse @ top_right
    left_factor = bottom_left @ top_left_inverse
    schur_inverse = invert_by_halving(bottom_right - bottom_left @ right_factor)
    upper_right = right_factor @ schur_inverse
    top = torch.cat([top_left_inverse + upper_right @ left_factor, -upper_right], dim=2)
    bottom = torch.cat([-schur_inverse @ left_factor, schur_inverse], dim=2)
    return torch.cat([top, bottom], dim=1)


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Q = (I + S)^-1 (I - S) = 2 (I + S)^-1 - I for a stack of skew-symmetric blocks."""
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype)
    if skew.device.type == "cpu" and skew.shape[-1] > _CPU_HALVING_MIN_WIDTH:
        return 2 * invert_by_halving(eye + skew) - eye
    return torch.linalg.solve(eye + skew, eye - skew)


class _Cayley(torch.autograd.Function):
    """Q = (I + S)^-1 (I - S) with a backward made of matmuls only.

    Autograd through `linalg.solve` would factorise again in backward. Here the inverse is
    recovered from Q itself: Q = 2 (I + S)^-1 - I, so (I + S)^-1 = (Q + I) / 2 and
    dL/dS = -1/2 (Q + I)^T G (Q + I)^T for G = dL/dQ. One inversion per forward, none in backward.
    """

    @staticmethod
    def forward(ctx, skew: torch.Tensor) -> torch.Tensor:
        q = cayley(skew)
        ctx.save_for_backward(q)
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (q,) = ctx.saved_tensors
        half_inverse_t = (q + torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)).transpose(-1, -2)
        return -0.5 * half_inverse_t @ grad @ half_inverse_t


@lru_cache(maxsize=None)
def neumann_coefficients(terms: int) -> tuple[float, ...]:
    """Coefficients c_k of the truncated series Q ~ sum_k c_k (-S)^k.

    The exact series of (I - S)(I + S)^-1 is I + 2 * sum_{k>=1} (-S)^k. PEFT truncates it with
    a last coefficient of 1 and treats 3 terms like 4; conftrl keeps the identical polynomial so
    that adapters trained with either library give the same outputs in both.
    """
    if terms <= 1:
        return (1.0,)
    if terms == 2:
        return (1.0, 2.0)
    last = max(terms - 1, 3)
    return (1.0,) + (2.0,) * (last - 1) + (1.0,)


class OFTRotation(nn.Module):
    """R = blockdiag(Q_1 .. Q_r) for one layer, with COFT's constraint and module dropout.

    It rotates the layer's input side, W' = W R^T (`side`); its parameter is saved under
    `saved_key` in PEFT's current format.
    """

    side = "input"
    saved_key = "oft_R.weight"

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        block_share: bool = False,
        coft: bool = False,
        eps: float = 6e-5,
        use_cayley_neumann: bool = False,
        num_cayley_neumann_terms: int = 5,
        module_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.block_share = block_share
        self.coft = coft
        self.eps = eps
        self.use_cayley_neumann = use_cayley_neumann
        self.num_cayley_neumann_terms = num_cayley_neumann_terms
        self.module_dropout = module_dropout
        stored = 1 if block_share else num_blocks
        self.weight = nn.Parameter(torch.zeros(stored, *self.stored_block_shape(block_size)))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        # Flat positions of the triangle in a row-major b x b block: a 1-D index_copy (and its
        # index_select backward) takes half the time of the equivalent two-index assignment.
        self.register_buffer("_upper_positions", rows * block_size + cols, persistent=False)

    @staticmethod
    def stored_block_shape(block_size: int) -> tuple[int, ...]:
        """Shape of one stored block: the strict upper triangle of S."""
        return (block_size * (block_size - 1) // 2,)

    @property
    def coft_radius(self) -> float:
        """Frobenius radius of each skew block: eps * b^2 / sqrt(n) (paper / original code)."""
        return self.eps * self.block_size**2 / math.sqrt(self.weight.shape[0])

    def reset(self, init_weights: bool) -> None:
        with torch.no_grad():
            if init_weights:
                self.weight.zero_()
            else:
                self.weight.normal_(0.0, 0.1 / max(1, self.block_size) ** 0.5)

    @torch.no_grad()
    def project_(self) -> None:
        """COFT: pull every block back into its ball, S <- S * min(1, rho / ||S||_F).

        ||U - U^T||_F = sqrt(2) ||u||, so the stored triangle is scaled directly. Nothing is
        written when all blocks are inside, which keeps autograd's version counters (and
        gradient-checkpointing recomputation) untouched in the common case.
        """
        if not self.coft:
            return
        radius = self.coft_radius
        norms = self.block_norms()
        # The tolerance makes projection idempotent: a block already scaled onto the sphere is
        # not rescaled by rounding noise on the next use.
        outside = norms > radius * (1.0 + _COFT_TOLERANCE)
        if bool(outside.any()):
            scale = torch.where(outside, radius / norms, torch.ones_like(norms))
            self.weight.mul_(scale.view(-1, *(1,) * (self.weight.dim() - 1)))

    def block_norms(self) -> torch.Tensor:
        """The Frobenius norm COFT constrains, per stored block: ||S||_F = sqrt(2) ||u||."""
        return self.weight.norm(dim=1) * math.sqrt(2.0)

    def skew(self) -> torch.Tensor:
        """The stored blocks as skew-symmetric matrices, shape (n, b, b)."""
        n, b = self.weight.shape[0], self.block_size
        upper = self.weight.new_zeros(n, b * b).index_copy(1, self._upper_positions, self.weight).view(n, b, b)
        return upper - upper.transpose(1, 2)

    def blocks(self) -> torch.Tensor:
        """The orthogonal blocks Q_i (n, b, b) in fp32 or the parameter's dtype.

        Built once per call of `checkpoint_keeping_rotations`, for its forward and its
        recomputation alike (`conftrl.oft.recompute`).
        """
        return blocks_of(self, self._build_blocks)

    def _build_blocks(self) -> torch.Tensor:
        """Autocast is off here: the blocks are small next to the activations, and bf16 products
        inside the inversion left Q orthogonal only to ~1e-3 (4 blocks of 320 on a CPU)."""
        self.project_()
        with torch.autocast(self.weight.device.type, enabled=False):
            skew = self.skew()
            if self.use_cayley_neumann:
                return self._neumann(skew)
            return self._cayley(skew)

    def _cayley(self, skew: torch.Tensor) -> torch.Tensor:
        return _Cayley.apply(skew)

    def _neumann(self, skew: torch.Tensor) -> torch.Tensor:
        coefficients = neumann_coefficients(self.num_cayley_neumann_terms)
        eye = torch.eye(self.block_size, device=skew.device, dtype=skew.dtype)
        result = eye.expand_as(skew).clone()
        power = None
        for coefficient in coefficients[1:]:
            power = -skew if power is None else torch.bmm(power, -skew)
            result = result + coefficient * power
        return result

    def dropped(self) -> bool:
        """Whether this training forward skips the adapter (module dropout)."""
        return self.training and self.module_dropout > 0 and bool(torch.rand(()) < self.module_dropout)

    def rotate_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W R^T for a flattened (out, d) weight, in its dtype."""
        return rotate_weight(weight, self.blocks().to(weight.dtype))

    def unrotate_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W from W R^T by an exact solve per block column (also exact for Neumann's near-rotations)."""
        out, d = weight.shape
        blocks = self.expanded_blocks().to(weight.dtype)
        columns = weight.reshape(out, self.num_blocks, self.block_size).transpose(0, 1)
        # Each block column satisfies W'_i = W_i Q_i^T; solve for W_i.
        restored = solve_blocks(blocks.transpose(1, 2), columns, left=False)
        return restored.transpose(0, 1).reshape(out, d)

    def expanded_blocks(self) -> torch.Tensor:
        """Blocks with a shared block repeated, shape (r, b, b); a view, never a dense matrix."""
        blocks = self.blocks()
        if self.block_share:
            return blocks.expand(self.num_blocks, -1, -1)
        return blocks

    def deviation(self) -> torch.Tensor:
        """||R - I||_F, for logging how far training has rotated the layer."""
        blocks = self.blocks()
        eye = torch.eye(self.block_size, device=blocks.device, dtype=blocks.dtype)
        per_block = (blocks - eye).pow(2).sum(dim=(1, 2))
        copies = self.num_blocks if self.block_share else 1
        return (per_block.sum() * copies).sqrt()

    def extra_repr(self) -> str:
        return (
            f"r={self.num_blocks}, block_size={self.block_size}, block_share={self.block_share}, "
            f"coft={self.coft}, eps={self.eps}, cayley_neumann={self.use_cayley_neumann}"
        )
