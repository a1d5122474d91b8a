"""Triton kernels, one op per file, each with its host launchers and its registered forms.

The LayerNorm/RMSNorm modulation ops (``adaln_modulate``, ``ada_rms_norm``,
``gated_residual_modulate``, the general forms in ``modulate_options`` and the RMSNorm sandwich in
``rms_sandwich``) share one kernel family, ``norm_modulate``, whose Triton row
helpers live in ``rows``; every op registers its forms (``torch.library.triton_op``, fake impl,
autograd) through ``registry``. Import the public ops from ``pf_kernels``, which routes CPU
tensors to the torch references in ``pf_kernels.reference``; ``_utils.LAUNCHES`` counts eager
kernel launches.
"""
