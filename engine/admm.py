"""ADMM state for weight pruning (Ye et al., 2019): Z (projection), U (scaled dual) and rho per layer.

W-step (every SGD step): the loss gets sum_l rho_l/2 ||W_l - Z_l + U_l||_F^2. Its gradient,
rho_l (W_l - Z_l + U_l), is added straight to ``W.grad`` after the adversarial loss's backward pass
(:meth:`ADMM.add_penalty_grad`): the same gradient as putting the penalty in the loss, without building
an autograd graph for it. :meth:`ADMM.penalty` gives the value for logging and for checking that claim.

Z-step and U-step (every ``admm.update_every`` epochs): Z = Proj(W + U), U = U + W - Z, then rho is
multiplied by ``rho_multiplier``. Initialisation: Z = Proj(W), U = 0.

Residuals: primal ||W - Z|| / ||W|| (relative) and dual rho ||Z_k - Z_(k-1)||.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .control import RHO_RANGE
from .pruning import project


class ADMM:
    def __init__(self, params: dict[str, nn.Parameter], ratios: dict[str, float], schemes: dict[str, str],
                 rho: float, rho_multiplier: float = 1.0) -> None:
        self.params = {k: p for k, p in params.items() if ratios.get(k, 0.0) > 0}
        self.ratios = {k: ratios[k] for k in self.params}
        self.schemes = {k: schemes[k] for k in self.params}
        self.rho = {k: float(rho) for k in self.params}
        self.rho_multiplier = float(rho_multiplier)
        self.updates = 0
        self.rho_history: list[dict] = []
        with torch.no_grad():
            self.Z = {k: project(p.detach(), self.schemes[k], self.ratios[k])[0] for k, p in self.params.items()}
            self.U = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.Z_prev = {k: z.clone() for k, z in self.Z.items()}

    @property
    def layers(self) -> list[str]:
        return list(self.params)

    def penalty(self) -> Tensor:
        """sum_l rho_l/2 ||W_l - Z_l + U_l||^2 as a differentiable scalar."""
        total = None
        for k, p in self.params.items():
            term = (self.rho[k] / 2) * (p - self.Z[k] + self.U[k]).pow(2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return total

    @torch.no_grad()
    def add_penalty_grad(self) -> None:
        """Add d(penalty)/dW = rho (W - Z + U) to each layer's gradient, in place."""
        for k, p in self.params.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(p - self.Z[k] + self.U[k], alpha=self.rho[k])

    @torch.no_grad()
    def update(self) -> dict[str, dict[str, float]]:
        """Z/U update, then rho *= rho_multiplier. Returns the residuals measured after the update (the dual
        with the rho of the step just ended) and, as ``rho``, the new rho that applies from now on."""
        for k, p in self.params.items():
            self.Z_prev[k] = self.Z[k]
            self.Z[k] = project(p + self.U[k], self.schemes[k], self.ratios[k])[0]
            self.U[k].add_(p - self.Z[k])
        res = self.residuals()
        self.updates += 1
        for k in self.rho:
            self.rho[k] *= self.rho_multiplier
            res[k]["rho"] = self.rho[k]
        return res

    @torch.no_grad()
    def residuals(self) -> dict[str, dict[str, float]]:
        """Per layer: primal ||W - Z|| / ||W||, dual rho ||Z - Z_prev||, rho. One host sync for all layers."""
        if not self.params:
            return {}
        vals = []
        for k, p in self.params.items():
            wn = p.norm()
            vals += [(p - self.Z[k]).norm() / wn.clamp_min(1e-12), self.rho[k] * (self.Z[k] - self.Z_prev[k]).norm()]
        flat = torch.stack(vals).tolist()
        return {k: {"primal": flat[2 * i], "dual": flat[2 * i + 1], "rho": self.rho[k]}
                for i, k in enumerate(self.params)}

    def set_rho(self, value: float, layer: str | None = None, multiply: bool = False) -> dict[str, float]:
        """Set (or multiply) rho for one layer or all; returns the new values of the layers touched."""
        if layer is not None and layer not in self.rho:
            raise KeyError(f"no ADMM layer named {layer!r}; layers: {', '.join(self.rho)}")
        keys = [layer] if layer is not None else list(self.rho)
        new = {k: self.rho[k] * value if multiply else float(value) for k in keys}
        lo, hi = RHO_RANGE
        bad = {k: v for k, v in new.items() if not lo <= v <= hi}
        if bad:  # nothing changes: a multiply must not carry any layer out of range
            k, v = next(iter(bad.items()))
            raise ValueError(f"rho of {k} would be {v:g}; expected {lo:g} to {hi:g}")
        self.rho.update(new)
        return new

    def state_dict(self) -> dict:
        return {"Z": dict(self.Z), "U": dict(self.U), "Z_prev": dict(self.Z_prev), "rho": dict(self.rho),
                "updates": self.updates, "rho_history": list(self.rho_history)}

    def load_state_dict(self, sd: dict) -> None:
        dev = next(iter(self.params.values())).device if self.params else None
        for name in ("Z", "U", "Z_prev"):
            getattr(self, name).update({k: v.to(dev) for k, v in sd[name].items()})
        self.rho.update({k: float(v) for k, v in sd["rho"].items()})
        self.updates = int(sd["updates"])
        self.rho_history = list(sd["rho_history"])
