"""Triton kernels, one op per file, each reading top to bottom: forward kernel, backward
kernel, host launchers (block sizes, strides), then registration (``torch.library.triton_op``
with explicit fake impls and ``register_autograd``; a plain ``autograd.Function`` on torch
< 2.6). Import the public ops from ``pf_kernels``, which routes CPU tensors to the torch
references in ``pf_kernels.reference``; ``_utils.LAUNCHES`` counts eager kernel launches.
"""
