"""NT-Xent contrastive loss (SimCLR; used by HybridMIM, Xing et al., arXiv 2303.10333).

Formula
-------
For ``z1, z2`` of shape ``(N, D)`` (two views of the same N samples), let ``u = normalize(cat(z1,
z2))`` (2N rows) and ``s_ij = u_i . u_j / T`` (cosine similarity over temperature). The positive
of row ``i`` is ``p(i) = (i + N) mod 2N``; all other ``2N - 2`` rows are negatives::

    L = 1/(2N) * sum_i -log( exp(s_{i,p(i)}) / sum_{k != i} exp(s_ik) )

This is exactly the released ``forward_constrast_loss`` (``Pretrain/losses/loss.py``, temperature
0.5), implemented here as a cross-entropy with the diagonal masked out (numerically stable).

The embeddings ``z`` come from the projection head of ``HybridMIMNetwork``: here a two-layer MLP
(``Linear(C, C) -> ReLU -> Linear(C, 384)``, SimCLR's head) by default, where the released code
projects with one linear layer (``contrast_learning_head = nn.Linear(C, 384)``);
``projection_hidden = 0`` on the trainer gives the released single layer.

DDP
---
With ``gather=True`` the embeddings of all ranks are gathered (:func:`gather_with_grad`) so the
negatives are the whole global batch. ``gather_with_grad`` exchanges the per-rank sizes, gathers, and puts
the local tensor (with its autograd history) back into its slot, so each rank back-propagates
the complete ``dL/dz_local`` of the *global* loss (every rank computes the same global loss).
DDP then averages gradients over ``W`` ranks, which would give ``1/W`` of the gradient of the
global loss; ``nt_xent(gather=True)`` therefore returns ``W * L - (W - 1) * L.detach()`` whose
value is ``L`` and whose gradient is ``W * dL``, so that after DDP's averaging the parameter
gradient equals the single-process gradient of the global-batch loss. Both are no-ops when
``torch.distributed`` is not initialised (or world size 1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["nt_xent", "gather_with_grad"]


def _dist_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_with_grad(z: torch.Tensor) -> torch.Tensor:
    """Concatenate ``z`` (``(n_rank, D)``) from all ranks along dim 0 in rank order, keeping the local
    gradient (other ranks' slices are constants: ``all_gather`` has no autograd).

    ``n_rank`` may differ between ranks: nnU-Net splits a global batch of 9 over 2 GPUs as 5 + 4, so
    sizes are exchanged first and the slices padded to the largest. No-op without DDP."""
    world = _dist_world_size()
    if world == 1:
        return z
    n = torch.tensor([z.shape[0]], device=z.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = z.detach().new_zeros((max(sizes), *z.shape[1:]))
    padded[: z.shape[0]] = z.detach()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    parts = [g[:s] for g, s in zip(gathered, sizes)]
    parts[dist.get_rank()] = z
    return torch.cat(parts, dim=0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = False) -> torch.Tensor:
    """SimCLR NT-Xent over ``2N`` samples (``2 * N * world_size`` with ``gather=True``)."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    world = _dist_world_size() if gather else 1
    if world > 1:
        z1 = gather_with_grad(z1)
        z2 = gather_with_grad(z2)
    n = z1.shape[0]
    u = F.normalize(torch.cat([z1, z2], dim=0).float(), dim=1)
    logits = u @ u.t() / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(eye, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(u.device)
    loss = F.cross_entropy(logits, targets)
    if world > 1:
        loss = world * loss - (world - 1) * loss.detach()
    return loss
