"""AdamW on float32 master weights of a network that computes in bfloat16, one pass per tensor.

Under CPU autocast with float32 parameters every step casts each weight to bfloat16 for
its matrix products and each bfloat16 gradient back to float32 for the optimizer: two
passes over every weight besides AdamW's own (bench/fuse_cpu.py: as long as AdamW itself
at the paper's shape). Here the network's parameters are bfloat16, so its matrix products
and gradients need no cast, and one compiled kernel per tensor reads the bfloat16
gradient, updates the float32 master weight and AdamW's float32 moments, and writes the
bfloat16 copy the next step computes with. The arithmetic is torch.optim.AdamW's.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn


def _update(
    weight: torch.Tensor,
    master: torch.Tensor,
    gradient: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step_size: torch.Tensor,
    decay: torch.Tensor,
    bias_correction2_sqrt: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    gradient = gradient.float()
    master.mul_(decay)
    exp_avg.lerp_(gradient, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
    master.sub_(step_size * exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps))
    weight.copy_(master)


@functools.cache
def _compiled_update():
    """The update compiled once for tensors of any length (None where Inductor cannot
    build a kernel, e.g. without a C++ compiler)."""
    update = torch.compile(_update, dynamic=True, fullgraph=True)
    probe = [torch.zeros(5, dtype=dtype) for dtype in (torch.bfloat16, torch.float32)]
    try:
        update(
            probe[0],
            probe[1],
            probe[0].clone(),
            probe[1].clone(),
            probe[1].clone(),
            torch.tensor(0.0),
            torch.tensor(1.0),
            torch.tensor(1.0),
            0.9,
            0.999,
            1e-8,
        )
    except Exception as error:  # noqa: BLE001 - any failure to compile means: not here
        print(
            f"note: bfloat16 heads keep float32 weights under autocast (no compiled "
            f"optimizer: {type(error).__name__}); training is slower, results the same",
            file=sys.stderr,
        )
        return None
    return update


def master_weights_available() -> bool:
    """Whether this machine can run MasterWeightAdamW's compiled update."""
    return _compiled_update() is not None


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW whose float32 master weights live here while `network` computes in bfloat16.

    Creating it casts `network`'s parameters to bfloat16 (the masters keep their float32
    values); `master_state_dict` gives the float32 weights to keep or restore. One
    compiled call per tensor: a flat buffer of every weight would need its gradients
    copied into one first, which costs more than the calls (bench/fuse_cpu.py's shape).
    """

    def __init__(
        self,
        network: nn.Module,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        update = _compiled_update()
        if update is None:
            raise RuntimeError("no compiled update on this machine: use torch.optim.AdamW")
        self._update = update
        self._names = [name for name, _ in network.named_parameters()]
        masters = [parameter.detach().float().clone() for parameter in network.parameters()]
        network.to(torch.bfloat16)
        super().__init__(
            list(network.parameters()),
            {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps},
        )
        for parameter, master in zip(self.param_groups[0]["params"], masters, strict=True):
            self.state[parameter] = {
                "step": 0,
                "master": master,
                "exp_avg": torch.zeros_like(master),
                "exp_avg_sq": torch.zeros_like(master),
            }

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the float32 master weights, by the network's parameter names."""
        (group,) = self.param_groups
        return {
            name: self.state[parameter]["master"].clone()
            for name, parameter in zip(self._names, group["params"], strict=True)
        }

    @torch.no_grad()
    def step(self, closure=None) -> None:  # noqa: D102 - torch.optim's contract
        if closure is not None:
            raise ValueError("MasterWeightAdamW takes no closure")
        (group,) = self.param_groups
        beta1, beta2 = group["betas"]
        scalars: dict[int, tuple[torch.Tensor, ...]] = {}  # per step count, made once
        for parameter in group["params"]:
            if parameter.grad is None:  # as AdamW: a weight without a gradient stays
                continue
            state = self.state[parameter]
            state["step"] += 1
            step = state["step"]
            if step not in scalars:
                scalars[step] = (
                    torch.tensor(group["lr"] / (1 - beta1**step)),
                    torch.tensor(1 - group["lr"] * group["weight_decay"]),
                    torch.tensor((1 - beta2**step) ** 0.5),
                )
            self._update(
                parameter.view(-1),
                state["master"].view(-1),
                parameter.grad.view(-1),
                state["exp_avg"].view(-1),
                state["exp_avg_sq"].view(-1),
                *scalars[step],
                beta1,
                beta2,
                group["eps"],
            )
