"""Registers an op's forms as ``pf_kernels::<name>`` custom ops: triton_op, fake, autograd.

Each form is a function with annotated arguments (torch infers the op's schema from them:
torch 2.11's ``triton_op`` ignores a ``schema=`` string and refuses an unannotated function).
Its fake impl is given explicitly: ``triton_op``'s default runs the launcher on fake tensors,
which works for compiled kernels but not for interpreter kernels, and hides output strides.
"""

from typing import Callable, Optional

import torch


def register(name: str, impl: Callable, fake: Callable, *, mutates_args=(), save: Optional[Callable] = None,
             backward: Optional[Callable] = None, non_differentiable: tuple = ()):
    """Registers ``impl`` as ``pf_kernels::<name>`` with its fake impl; returns the op.

    With ``backward``: its autograd. ``save(*inputs, output)`` returns what the backward needs
    (tensors, None, or plain values such as eps), and ``backward(grads, *saved)`` returns the
    grads of the op's leading inputs (the rest get None). ``non_differentiable``: positions of
    outputs that take no grad (the row statistics of the ``*_with_stats`` forms).
    """
    op = torch.library.triton_op(f"pf_kernels::{name}", impl, mutates_args=mutates_args)
    op.register_fake(fake)
    if backward is None:
        return op

    def setup_context(ctx, inputs, output):
        if non_differentiable:
            ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
        saved = save(*inputs, output)
        is_tensor = [v is None or isinstance(v, torch.Tensor) for v in saved]
        ctx.save_for_backward(*(v for v, t in zip(saved, is_tensor) if t))
        ctx.plain = [None if t else v for v, t in zip(saved, is_tensor)]
        ctx.is_tensor, ctx.n_inputs = is_tensor, len(inputs)

    def backward_fn(ctx, *grads):
        tensors = iter(ctx.saved_tensors)
        saved = [next(tensors) if t else v for v, t in zip(ctx.plain, ctx.is_tensor)]
        input_grads = tuple(backward(grads, *saved))
        return (*input_grads, *(None,) * (ctx.n_inputs - len(input_grads)))

    op.register_autograd(backward_fn, setup_context=setup_context)
    return op
