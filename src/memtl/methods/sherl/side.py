"""The side module of SHERL's early route (DESIGN §2), independent of any architecture.

    z_i = P_i(h_i)                              one projection per kept feature (d -> d')
    u   = AntiRedundancyFusion(z_0..z_{L-1}, z_L)
    out = Dropout(LayerNorm(Linear(ReLU(u)))) + tanh(g / T) * h_L

Every operation works per token, so padded positions never mix with real ones here (the
late layers' attention masks them out afterwards).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

#: guards the three divisions of the fusion: vector norms (cosine), the redundancy ρ
#: and the L1 normaliser. Clamping (not adding) keeps the formulas exact whenever the
#: guarded quantity is >= EPS, which it is in practice (ρ_j >= 1 because m includes j).
EPS = 1e-6


class LinearProjection(nn.Module):
    """``Linear(d→d') + LayerNorm`` (the BERT/CLIP text-encoder variant)."""

    def __init__(self, dim: int, side_dim: int, eps: float, **kw):
        super().__init__()
        self.linear = nn.Linear(dim, side_dim, **kw)
        self.layer_norm = nn.LayerNorm(side_dim, eps=eps, **kw)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.linear(h))


class GatedProjection(nn.Module):
    """The T5 variant's gated two-layer MLP: ``x = relu(fc1(h))``,
    ``z = (fc2(x) + x) * sigmoid(fc3(x))`` (the authors' ``Adapter`` of ``MTSAdapter``)."""

    def __init__(self, dim: int, side_dim: int, eps: float, **kw):
        super().__init__()
        self.fc1 = nn.Linear(dim, side_dim, **kw)
        self.fc2 = nn.Linear(side_dim, side_dim, **kw)
        self.fc3 = nn.Linear(side_dim, side_dim, **kw)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(h))
        return (self.fc2(x) + x) * torch.sigmoid(self.fc3(x))


PROJECTIONS = {"linear": LinearProjection, "gated": GatedProjection}


class AntiRedundancyFusion(nn.Module):
    """Fuse the shallow features into the deep one, per token (DESIGN §2):

    - ``ρ_j = Σ_m relu(cos(z_j, z_m))`` over ALL shallow layers m, j itself included (as
      DESIGN's formula and the authors' ``Guidance.get_redundancy``, whose similarity map
      keeps its diagonal): a layer unlike every other has ρ_j = 1, a layer repeated r times
      has ρ_j ≈ r, so redundant layers share one layer's weight;
    - ``a_j = relu(w·(z_j ⊙ deep) + b) / ρ_j``, then L1-normalised over j;
    - ``u = Σ_j a_j z_j + deep``.

    Written so that backward keeps only the stacked shallow features (one d'-wide tensor
    per layer) plus per-token scalars: the cosine comes from the Gram matrix and the norms,
    and ``w·(z_j ⊙ deep)`` is computed as ``z_j · (w ⊙ deep)`` (no per-layer product).
    """

    def __init__(self, side_dim: int, **kw):
        super().__init__()
        self.score = nn.Linear(side_dim, 1, **kw)  # w (weight) and b (bias)

    def weights(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """The normalised scores ``a``: shape (..., L) for shallow (..., L, d'), deep (..., d')."""
        norms = shallow.norm(dim=-1).clamp_min(EPS)  # (..., L)
        gram = shallow @ shallow.transpose(-1, -2)  # (..., L, L)
        cos = gram / (norms.unsqueeze(-1) * norms.unsqueeze(-2))
        rho = torch.relu(cos).sum(-1).clamp_min(EPS)  # (..., L)
        guide = self.score.weight[0] * deep  # w ⊙ deep, (..., d')
        s = (shallow @ guide.unsqueeze(-1)).squeeze(-1) + self.score.bias  # w·(z_j ⊙ deep) + b
        a = torch.relu(s) / rho
        return a / a.sum(-1, keepdim=True).clamp_min(EPS)

    def forward(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        a = self.weights(shallow, deep)
        return (a.unsqueeze(-2) @ shallow).squeeze(-2) + deep


class SideModule(nn.Module):
    """Projections + fusion + output block + gated skip: the trainable early route.

    ``forward(features)`` takes the kept frozen features ``[h_0, …, h_L]`` (each
    (batch, seq, d), computed without a graph) and returns the input of the late layers.
    """

    def __init__(self, num_features: int, dim: int, side_dim: int, projection: str, dropout: float,
                 temperature: float, layer_norm_eps: float, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        make = PROJECTIONS[projection]
        self.projections = nn.ModuleList(make(dim, side_dim, eps=layer_norm_eps, **kw)
                                         for _ in range(num_features))
        self.fusion = AntiRedundancyFusion(side_dim, **kw)
        # output block: ReLU -> Linear(d'->d) -> LayerNorm -> Dropout
        self.out_proj = nn.Linear(side_dim, dim, **kw)
        self.out_norm = nn.LayerNorm(dim, eps=layer_norm_eps, **kw)
        self.dropout = nn.Dropout(dropout)
        # gated skip from h_L: tanh(g / T), g starts at 0 (closed)
        self.gate = nn.Parameter(torch.zeros((), **kw))
        self.temperature = temperature
        # recompute each projection in backward, from its input h_i alone (gradient checkpointing)
        self.checkpoint_projections = False

    def project(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_projections and self.training and torch.is_grad_enabled():
            return checkpoint(self.projections[i], h, use_reentrant=False)
        return self.projections[i](h)

    def combine(self, zs: list[torch.Tensor], h_last: torch.Tensor) -> torch.Tensor:
        """Fusion + output block from the projected features ``zs = [z_0, …, z_L]``.

        Empties ``zs``: once stacked, the per-layer z_i must not stay alive beside the stack
        (that would double the d'-wide per-layer memory for the rest of the forward)."""
        deep = zs.pop()
        shallow = torch.stack(zs, dim=-2)  # (batch, seq, L, d')
        zs.clear()
        u = self.fusion(shallow, deep)
        out = self.dropout(self.out_norm(self.out_proj(torch.relu(u))))
        return out + torch.tanh(self.gate / self.temperature) * h_last

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.combine([self.project(i, h) for i, h in enumerate(features)], features[-1])
