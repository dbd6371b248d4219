"""AdamW on bfloat16 working weights over float32 master weights, in one pass over memory.

Under CPU bfloat16 autocast a training step casts every float32 weight to bfloat16 for the
forward, casts every bfloat16 weight gradient back to float32, and fused AdamW then reads
and writes the float32 weights and both moments: about 44 bytes moved per parameter and
step, where the optimizer alone needs 28. On a head of the paper's shape (11M parameters)
the step is memory-bound, so the extra passes are its largest waste.

Here the master weights, the moments, the bfloat16 working copy and the bfloat16 gradients
are each one flat buffer. A Dense layer's backward writes its weight and bias gradients
straight into their views of the gradient buffer (`addmm_into_slots`), so no pass gathers
them there. One compiled kernel (torch.compile, Inductor's C++ backend)
reads the bfloat16 gradient, updates the master weights and moments as torch's AdamW does
(decoupled weight decay, bias-corrected moments), and writes the new working copy in the
same pass; the forward reads the working copy through torch.func.functional_call, so the
model's own parameters stay the float32 master weights that selection snapshots and a
saved head stores. Where compiling fails (no C++ compiler), the same update runs eagerly:
slower, equal in result.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# A compile costs about 3 s per process with Inductor's cache warm and 13-20 s cold; the
# fused pass saved 3 ms of 24 a step on an 11M-parameter head (2 threads), and writing the
# gradients straight into its buffer about 1.5 ms more, but the demo's 2M ones went only
# from 8.5 to 8.0 ms a step (one core), so smaller heads keep autocast and fused AdamW
# (README, "Defaults, and why": precision).
FUSED_UPDATE_MIN_PARAMETERS = 4_000_000
# A weight gradient inputs^T @ output_gradient runs faster from a transposed copy of the
# inputs when the product is wide: the copy is one pass over the batch's inputs, and it
# pays back over the output's columns. On a 2-core AMX Xeon the 4096 x 2048 text
# projector's gradient took 1.6 ms from the strided inputs and 1.1 ms + 0.1 ms for the
# copy; at 512 or 256 columns the copy cost more than it saved.
TRANSPOSED_COPY_MIN_COLUMNS = 1024


def fused_update_pays(model: nn.Module, precision: str) -> bool:
    """Whether `model` trains faster with FusedBF16AdamW than with autocast and AdamW."""
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return precision == "bf16" and parameters >= FUSED_UPDATE_MIN_PARAMETERS


def adamw_update(
    master: torch.Tensor,
    first_moment: torch.Tensor,
    second_moment: torch.Tensor,
    gradient: torch.Tensor,
    working: torch.Tensor,
    decay_factor: torch.Tensor,
    step_size: torch.Tensor,
    second_correction_root: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """One AdamW step on flat buffers, in place, as torch.optim.AdamW computes it.

    decay_factor is 1 - lr x weight_decay, step_size lr / (1 - beta1^t) and
    second_correction_root sqrt(1 - beta2^t): 0-d tensors, so that a compiled kernel
    takes a new learning rate without compiling again.
    """
    grad = gradient.float()
    master.mul_(decay_factor)
    first_moment.lerp_(grad, 1 - beta1)
    second_moment.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denominator = second_moment.sqrt() / second_correction_root + eps
    master.sub_(step_size * first_moment / denominator)
    working.copy_(master)


@dataclass
class GradientSlot:
    """Where the gradient of one working weight goes: its view of the flat gradient buffer,
    and whether this step's backward has written it yet."""

    buffer: torch.Tensor
    written: bool = False

    def take(self, gradient: torch.Tensor) -> None:
        """Write `gradient`, or add it if the weight was used more than once this step."""
        if self.written:
            self.buffer.add_(gradient)
        else:
            self.buffer.copy_(gradient)
            self.written = True

    def take_product(self, left: torch.Tensor, right: torch.Tensor) -> None:
        """take(left @ right), the product written straight into the buffer when first."""
        if self.written:  # the sum, rounded as autograd rounds it
            self.take(left @ right)
        else:
            torch.mm(left, right, out=self.buffer)
            self.written = True


class _AddmmIntoSlots(torch.autograd.Function):
    """bias + inputs @ weight whose backward puts the weight's and bias's gradients in their
    slots rather than returning them: autograd would allocate each one and the optimizer
    would then copy it into the flat buffer, a pass over every gradient per step."""

    @staticmethod
    def forward(ctx, bias, inputs, weight, bias_slot, weight_slot):
        inputs = inputs.to(weight.dtype)  # what autocast would give the product
        ctx.save_for_backward(inputs, weight)
        ctx.slots = bias_slot, weight_slot
        return torch.addmm(bias, inputs, weight)

    @staticmethod
    def backward(ctx, output_gradient):
        inputs, weight = ctx.saved_tensors
        bias_slot, weight_slot = ctx.slots
        output_gradient = output_gradient.to(weight.dtype)
        transposed = inputs.t()
        if weight.shape[1] >= TRANSPOSED_COPY_MIN_COLUMNS:
            transposed = transposed.contiguous()
        weight_slot.take_product(transposed, output_gradient)
        bias_slot.take(output_gradient.sum(dim=0))
        input_gradient = output_gradient @ weight.t() if ctx.needs_input_grad[1] else None
        return None, input_gradient, None, None, None


def addmm_into_slots(bias: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor):
    """torch.addmm(bias, inputs, weight) for working weights that carry a `gradient_slot`
    (FusedBF16AdamW's): the backward writes their gradients into the flat buffer."""
    return _AddmmIntoSlots.apply(bias, inputs, weight, bias.gradient_slot, weight.gradient_slot)


class _Kernel:
    """The compiled update; the eager one for good once compiling has failed (said once)."""

    def __init__(self) -> None:
        self._compiled: Callable[..., None] | None = None
        self._eager = False

    def __call__(self, *arguments) -> None:
        if not self._eager:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(adamw_update, dynamic=True, fullgraph=True)
                self._compiled(*arguments)
                return
            except Exception as error:  # noqa: BLE001 - compile errors share no base class
                warnings.warn(
                    f"fuse: the fused bf16 AdamW update could not be compiled "
                    f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                    "it runs uncompiled, equal in result and slower",
                    stacklevel=3,
                )
                self._eager = True
        adamw_update(*arguments)


_KERNEL = _Kernel()


class FusedBF16AdamW(torch.optim.Optimizer):
    """AdamW whose step is one fused pass over flat float32 master weights and moments,
    reading bfloat16 gradients and writing the bfloat16 working copy the forward uses.

    The model's parameters become views of the flat master buffer (float32, as before);
    `forward` runs the model on the bfloat16 working copy, and `step` follows a backward
    of its output. Each working weight carries a `gradient_slot`, its view of the flat
    gradient buffer, which fuse.model.Dense's backward writes into directly; a gradient
    that autograd returns instead (a weight outside a Dense layer) is copied there by
    `step`. `release` gives the parameters their own storage again.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self._model = model
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self._names = [name for name, _ in named]
        master = torch.cat([p.detach().float().reshape(-1) for _, p in named])
        self._master = nn.Parameter(master)
        super().__init__(
            [self._master], {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        )
        self._working = master.to(torch.bfloat16)
        self._gradient = torch.empty_like(self._working)
        self._first_moment = torch.zeros_like(master)
        self._second_moment = torch.zeros_like(master)
        self._steps = 0
        self._working_leaves: list[torch.Tensor] = []
        start = 0
        for _, parameter in named:
            end = start + parameter.numel()
            parameter.data = self._master.data[start:end].view_as(parameter)
            leaf = self._working[start:end].view_as(parameter).requires_grad_()
            leaf.gradient_slot = GradientSlot(self._gradient[start:end].view_as(parameter))
            self._working_leaves.append(leaf)
            start = end

    def forward(self, *inputs):
        """The model's output on `inputs`, computed with the bfloat16 working weights."""
        weights = dict(zip(self._names, self._working_leaves, strict=True))
        return torch.func.functional_call(self._model, weights, inputs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the last backward's gradients (the next one writes or allocates anew)."""
        for leaf in self._working_leaves:
            leaf.grad = None
            leaf.gradient_slot.written = False

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        """Update master weights, moments and working copy from the last backward."""
        for leaf in self._working_leaves:
            slot = leaf.gradient_slot
            if leaf.grad is not None:
                slot.take(leaf.grad)
            elif not slot.written:
                # An output the loss does not read (NT-Xent's maps when its weight is 0):
                # a zero gradient, on which AdamW only decays the weight.
                slot.buffer.zero_()
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        self._steps += 1
        lr = group["lr"]
        scalars = (
            torch.tensor(1 - lr * group["weight_decay"]),
            torch.tensor(lr / (1 - beta1**self._steps)),
            torch.tensor((1 - beta2**self._steps) ** 0.5),
        )
        _KERNEL(
            self._master.data,
            self._first_moment,
            self._second_moment,
            self._gradient,
            self._working,
            *scalars,
            beta1,
            beta2,
            group["eps"],
        )

    def release(self) -> None:
        """Give every model parameter its own float32 storage (a saved head's tensors must
        not share memory), leaving this optimizer unusable."""
        for parameter in self._model.parameters():
            parameter.data = parameter.data.clone()
