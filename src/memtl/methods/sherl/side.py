"""The side module of SHERL's early route (docs/DESIGN.md §2), independent of any architecture.

    z_i = P_i(h_i)                              one projection per kept feature (d -> d')
    u   = AntiRedundancyFusion(z_0..z_{L-1}, z_L)
    out = Dropout(LayerNorm(Linear(ReLU(u)))) + tanh(g / T) * h_L

With the pre-trained starting point kept (``keep_pretrained_start``, docs/DESIGN.md §2 "Starting
point") the skip weight is 1 and the side output starts at exactly 0:

    out_proj form:  out = h_L + Dropout(Linear_0(LayerNorm(ReLU(u))))    (Linear_0 zero at init)
    scale form:     out = h_L + α · Dropout(LayerNorm(Linear(ReLU(u))))   (scalar α, 0 at init)

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
    """``Linear(d→d') + LayerNorm`` (the BERT text-encoder variant)."""

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

#: how the side output starts at 0 when the pre-trained starting point is kept
START_FORMS = ("out_proj", "scale")


class _FusionFunction(torch.autograd.Function):
    """The anti-redundancy fusion with a hand-written backward, on flattened tokens.

    Shapes: ``shallow`` (N, L, d'), ``deep`` (N, d'), ``w`` (d'), ``b`` (1). Forward runs
    without a graph and saves only ``shallow``, ``deep`` and per-token vectors of length L;
    backward writes the gradient of ``shallow`` into ONE (N, L, d') buffer (in-place
    batched rank-1 updates), where plain autograd through the same formulas would hold
    several such buffers at once (one per use of ``shallow``: norm, Gram matrix, score,
    weighted sum) and dominate the step's peak memory as the number of early layers grows.
    The small (N, L, L) cosine matrix is recomputed in backward rather than kept.
    """

    @staticmethod
    def forward(ctx, shallow, deep, w, b):
        zn = shallow.norm(dim=-1)  # (N, L)
        n = zn.clamp_min(EPS)
        cos = torch.bmm(shallow, shallow.transpose(1, 2)) / (n.unsqueeze(2) * n.unsqueeze(1))  # (N, L, L)
        rs = torch.relu(cos).sum(-1)  # Σ_m relu(cos(z_j, z_m)), m over all shallow layers (j included)
        rho = rs.clamp_min(EPS)
        v = deep * w  # w ⊙ deep: w·(z_j ⊙ deep) = z_j·(w ⊙ deep)
        s = torch.bmm(shallow, v.unsqueeze(2)).squeeze(2) + b  # (N, L)
        r = torch.relu(s)
        ap = r / rho
        sa = ap.sum(-1, keepdim=True)
        a = ap / sa.clamp_min(EPS)  # L1 normalisation (a >= 0)
        u = torch.bmm(a.unsqueeze(1), shallow).squeeze(1) + deep
        ctx.save_for_backward(shallow, deep, w, zn, rs, s, sa)
        return u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gu):
        shallow, deep, w, zn, rs, s, sa = ctx.saved_tensors
        # recompute the small per-token quantities
        n = zn.clamp_min(EPS)
        cos = torch.bmm(shallow, shallow.transpose(1, 2)) / (n.unsqueeze(2) * n.unsqueeze(1))
        rho = rs.clamp_min(EPS)
        r = torch.relu(s)
        ap = r / rho
        S = sa.clamp_min(EPS)
        a = ap / S
        v = deep * w
        # u = Σ_j a_j z_j + deep
        ga = torch.bmm(shallow, gu.unsqueeze(2)).squeeze(2)  # (N, L)
        # a = ap / S (S = Σ ap unless clamped)
        gap = ga / S - (sa > EPS) * (ga * ap).sum(-1, keepdim=True) / S**2
        # ap = relu(s) / rho
        gs = gap / rho * (s > 0)
        grs = -gap * r / rho**2 * (rs > EPS)
        # rs_j = Σ_m relu(cos_jm); cos_jm = G_jm / (n_j n_m)
        gcos = grs.unsqueeze(2) * (cos > 0)  # (N, L, L)
        gG = gcos / (n.unsqueeze(2) * n.unsqueeze(1))
        gc = gcos * cos
        gn = -(gc.sum(2) + gc.sum(1)) / n
        gzn = gn * (zn > EPS)
        # accumulate d loss / d shallow in one buffer
        gshallow = torch.bmm(gG + gG.transpose(1, 2), shallow)  # from G = Z Zᵀ
        gshallow.baddbmm_(a.unsqueeze(2), gu.unsqueeze(1))  # from Σ_j a_j z_j
        gshallow.baddbmm_(gs.unsqueeze(2), v.unsqueeze(1))  # from s_j = z_j·v + b
        gshallow.addcmul_(shallow, (gzn / zn.clamp_min(torch.finfo(zn.dtype).tiny)).unsqueeze(2))  # from ‖z_j‖
        gv = torch.bmm(gs.unsqueeze(1), shallow).squeeze(1)  # (N, d')
        gdeep = gu + gv * w
        gw = (gv * deep).sum(0)
        gb = gs.sum().reshape(1)
        return gshallow, gdeep, gw, gb


class AntiRedundancyFusion(nn.Module):
    """Fuse the shallow features into the deep one, per token (docs/DESIGN.md §2):

    - ``ρ_j = Σ_m relu(cos(z_j, z_m))`` over ALL shallow layers m, j itself included (as
      docs/DESIGN.md's formula and the authors' ``Guidance.get_redundancy``, whose similarity map
      keeps its diagonal): a layer unlike every other has ρ_j = 1, a layer repeated r times
      has ρ_j ≈ r, so redundant layers share one layer's weight;
    - ``a_j = relu(w·(z_j ⊙ deep) + b) / ρ_j``, then L1-normalised over j;
    - ``u = Σ_j a_j z_j + deep``.

    ``cos`` divides by ``max(‖z‖, EPS)``; ρ and the L1 sum are clamped at ``EPS``.
    Backward is hand-written (``_FusionFunction``) to keep one gradient buffer; the tests
    check it against finite differences and a loop-by-loop recomputation.
    """

    def __init__(self, side_dim: int, **kw):
        super().__init__()
        self.score = nn.Linear(side_dim, 1, **kw)  # w (weight) and b (bias)

    def forward(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """``shallow`` (..., L, d'), ``deep`` (..., d') -> ``u`` (..., d')."""
        lead, (L, d) = deep.shape[:-1], shallow.shape[-2:]
        # one dtype throughout, autocast off: the hand-written backward runs outside the
        # caller's autocast and would otherwise meet bf16 and fp32 tensors in one bmm
        dt = shallow.dtype
        with torch.autocast(shallow.device.type, enabled=False):
            u = _FusionFunction.apply(shallow.reshape(-1, L, d), deep.reshape(-1, d).to(dt),
                                      self.score.weight[0].to(dt), self.score.bias.to(dt))
        return u.reshape(*lead, d)


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
        # recompute the side module in backward from its inputs h_i, each projection on its own
        # (recompute_side / gradient checkpointing): between forward and backward the side
        # module then keeps nothing of its own
        self.recompute = False
        self.start_form: str | None = None  # None: the paper's gated skip; else keep_pretrained_start's form

    def keep_pretrained_start(self, form: str) -> None:
        """Start from the pre-trained function: the late layers receive exactly h_L at init
        (skip weight 1, no gate) plus a side output that is 0 at init and learns a correction.

        ``out_proj``: the output block's Linear starts at zero and comes last, its LayerNorm
        moves before it (a LayerNorm after a zero vector has no gradient); the correction can
        grow as fast as a LoRA update (every weight moves at the learning rate).
        ``scale``: the block stays as the paper's and its output is multiplied by a learnable
        scalar α = 0 (the correction grows at most by the learning rate per step).
        """
        kw = {"dtype": self.out_proj.weight.dtype, "device": self.out_proj.weight.device}
        self.start_form = form
        self.gate = None  # the skip weight is a constant 1
        if form == "out_proj":
            self.out_norm = nn.LayerNorm(self.out_proj.in_features, eps=self.out_norm.eps, **kw)
            nn.init.zeros_(self.out_proj.weight)
            nn.init.zeros_(self.out_proj.bias)
        else:
            self.scale = nn.Parameter(torch.zeros((), **kw))

    def diagnostics(self) -> dict[str, float]:
        """What to watch while training: the paper's skip-gate opening tanh(g/T) (0 at init:
        how much of the pre-trained h_L the late layers see beside the side output), or,
        with the starting point kept, how far the correction has moved from 0: the scale
        form's α, or the RMS of the out_proj form's output weight."""
        if self.start_form is None:
            return {"sherl_skip_gate": float(torch.tanh(self.gate.detach().float() / self.temperature))}
        if self.start_form == "scale":
            return {"sherl_side_scale": float(self.scale.detach())}
        return {"sherl_out_proj_rms": float(self.out_proj.weight.detach().float().square().mean().sqrt())}

    def _recomputing(self) -> bool:
        return self.recompute and self.training and torch.is_grad_enabled()

    def project(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self._recomputing():
            return checkpoint(self.projections[i], h, use_reentrant=False)
        return self.projections[i](h)

    def combine(self, zs: list[torch.Tensor], h_last: torch.Tensor) -> torch.Tensor:
        """Fusion + output block from the projected features ``zs = [z_0, …, z_L]``.

        Empties ``zs``: once stacked, the per-layer z_i must not stay alive beside the stack
        (that would double the d'-wide per-layer memory for the rest of the forward)."""
        deep = zs.pop()
        shallow = torch.stack(zs, dim=-2)  # (batch, seq, L, d')
        zs.clear()
        u = torch.relu(self.fusion(shallow, deep))
        if self.start_form == "out_proj":
            return h_last + self.dropout(self.out_proj(self.out_norm(u)))
        out = self.dropout(self.out_norm(self.out_proj(u)))
        if self.start_form == "scale":
            return h_last + self.scale * out
        return out + torch.tanh(self.gate / self.temperature) * h_last

    def _forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.combine([self.project(i, h) for i, h in enumerate(features)], features[-1])

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self._recomputing():
            return checkpoint(self._forward, features, use_reentrant=False)
        return self._forward(features)


# --- the early route's no-grad switch (used by every architecture) ---------------------


def _no_grad_enter(module: nn.Module, args) -> None:
    module._sherl_grad_enabled = torch.is_grad_enabled()
    torch.set_grad_enabled(False)


def _no_grad_exit(module: nn.Module, args, output) -> None:
    torch.set_grad_enabled(module.__dict__.pop("_sherl_grad_enabled", True))


def run_without_grad(module: nn.Module) -> None:
    """Make ``module`` always run under ``torch.no_grad()`` (hooks, so the module's class,
    name and state-dict keys stay as they are; the exit hook runs even on an exception)."""
    module.register_forward_pre_hook(_no_grad_enter)
    module.register_forward_hook(_no_grad_exit, always_call=True)
