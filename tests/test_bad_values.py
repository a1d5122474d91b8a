"""Silent nonsense refused in one line (issue 27, finding 8): values that used to run and give a
meaningless result (a saturated picture, a classifier trained on nothing, a kernel reading an
integer tensor's bits) now stop with a ValueError naming the value."""

from __future__ import annotations

import math

import pytest
import torch

import pf_kernels
from model_helpers import tiny_global_model, tiny_model
from pf import samplers
from pf.encoders.classifier import check_training, train_classifier
from pf.samplers import LookAhead, outer_schedule


# ------------------------------------------------------------------ samplers
@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, True, "4"])
def test_every_sampler_refuses_a_guidance_scale_that_is_not_a_finite_number(name, scale):
    model = tiny_global_model() if name in ("euler", "heun", "sde") else tiny_model()
    x = torch.randn(2, model.in_channels, model.input_size, model.input_size, dtype=torch.float64)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"cfg_scale must be a finite number, got"):
        samplers.make(name)(model, x, 4, y=y, cfg_scale=scale)


@pytest.mark.parametrize("steps", [True, False])
def test_a_bool_is_not_a_step_count(steps):
    # issue 27: steps=True ran one step
    with pytest.raises(ValueError, match=r"timesteps must be a number of steps or a sequence of times"):
        outer_schedule(steps)
    model = tiny_model()
    with pytest.raises(ValueError, match=r"timesteps must be a number of steps"):
        samplers.make("euler_pf")(model, torch.randn(1, model.in_channels, model.input_size, model.input_size,
                                                     dtype=torch.float64), steps)


@pytest.mark.parametrize("ratio", [math.inf, math.nan, 0.5])
def test_look_ahead_context_ratio_is_finite_and_at_least_one(ratio):
    with pytest.raises(ValueError, match=r"context_t_ratio must be a finite number >= 1"):
        LookAhead(context_t_ratio=ratio)


def test_sample_command_refuses_a_non_finite_guidance_scale():
    from pf.cli import UsageError
    from pf.sample import parse_args

    for value in (".inf", "-.inf", ".nan"):  # YAML's infinities and NaN (the text "inf" was already refused)
        with pytest.raises(UsageError, match=r"cfg must be a finite number"):
            parse_args(["ckpt=x.pt", f"cfg={value}"])
    with pytest.raises(UsageError, match=r"steps=True: expected an integer"):
        parse_args(["ckpt=x.pt", "steps=True"])


# ------------------------------------------------------------------ the fused ops
X = torch.randn(2, 3, 5)
MOD = torch.randn(2, 1, 5)
INDEX = torch.zeros(2, 3, dtype=torch.long)
TABLE = torch.randn(2, 2, 5)
NORM_OPS = {  # op -> a call with given x and eps
    "adaln_modulate": lambda x, eps: pf_kernels.adaln_modulate(x, MOD, MOD, eps),
    "adaln_modulate_indexed": lambda x, eps: pf_kernels.adaln_modulate_indexed(x, TABLE, TABLE, INDEX, eps),
    "gated_residual_modulate": lambda x, eps: pf_kernels.gated_residual_modulate(x, MOD, X, MOD, MOD, eps),
    "gated_residual_modulate_indexed": lambda x, eps: pf_kernels.gated_residual_modulate_indexed(
        x, TABLE, X, TABLE, TABLE, INDEX, eps),
    "ada_rms_norm": lambda x, eps: pf_kernels.ada_rms_norm(x, MOD, eps),
    "ada_rms_norm_indexed": lambda x, eps: pf_kernels.ada_rms_norm_indexed(x, TABLE, INDEX, eps),
    "norm_modulate": lambda x, eps: pf_kernels.norm_modulate(x, MOD, MOD, eps=eps),
    "residual_norm_modulate": lambda x, eps: pf_kernels.residual_norm_modulate(x, MOD, X, MOD, MOD, eps=eps),
    "sandwich_residual_norm_modulate": lambda x, eps: pf_kernels.sandwich_residual_norm_modulate(x, MOD, X, MOD,
                                                                                                 eps=eps),
}


@pytest.mark.parametrize("op", sorted(NORM_OPS))
def test_norm_ops_refuse_integer_data_and_a_negative_or_nan_eps(op):
    call = NORM_OPS[op]
    call(X, 1e-6)  # the same call with a good eps runs
    call(X, 0)
    for eps in (-1e-6, math.nan, math.inf, "1e-6"):
        with pytest.raises(ValueError, match=rf"{op}: eps must be a finite number >= 0, got"):
            call(X, eps)
    with pytest.raises(ValueError, match=rf"{op}: \w+ must be a floating-point tensor, got torch.int64"):
        call(X.round().long(), 1e-6)


def test_sandwich_ops_name_the_bad_argument():
    """The RMSNorm sandwich: y's own eps, y's shape and the norms' weights, each one clear line."""
    for op, call in (("sandwich_residual", lambda **kw: pf_kernels.sandwich_residual(X, MOD, X, **kw)),
                     ("sandwich_residual_norm_modulate",
                      lambda **kw: pf_kernels.sandwich_residual_norm_modulate(X, MOD, X, MOD, **kw))):
        call(y_eps=0)  # good arguments run
        for eps in (-1e-6, math.nan, "1e-6"):
            with pytest.raises(ValueError, match=rf"{op}: y_eps must be a finite number >= 0, got"):
                call(y_eps=eps)
        with pytest.raises(ValueError, match=rf"{op}: y_weight must be a \(5,\) tensor"):
            call(y_weight=torch.ones(4))
        with pytest.raises(ValueError, match=rf"{op}: gate must be a floating-point tensor, got torch.int64"):
            (pf_kernels.sandwich_residual if op == "sandwich_residual" else pf_kernels.sandwich_residual_norm_modulate)(
                X, MOD.long(), X)
    with pytest.raises(ValueError, match=r"sandwich_residual: y must have x's shape \(2, 3, 5\), got \(2, 1, 5\)"):
        pf_kernels.sandwich_residual(X, MOD, MOD)
    with pytest.raises(ValueError, match=r"sandwich_residual_norm_modulate: weight must be a \(5,\) tensor"):
        pf_kernels.sandwich_residual_norm_modulate(X, MOD, X, MOD, weight=torch.ones(2, 5))


def test_residual_and_euler_ops_refuse_integer_data():
    with pytest.raises(ValueError, match=r"gated_residual: gate must be a floating-point tensor, got torch.int64"):
        pf_kernels.gated_residual(X, MOD.long(), X)
    with pytest.raises(ValueError, match=r"gated_residual_indexed: x must be a floating-point tensor"):
        pf_kernels.gated_residual_indexed(X.long(), TABLE, X, INDEX)
    for gate in (None, MOD):  # the general residual, ungated and gated, with and without an output dtype
        for out_dtype in (None, torch.float32):
            with pytest.raises(ValueError, match=r"residual: x must be a floating-point tensor, got torch.int64"):
                pf_kernels.residual(X.long(), gate, X, out_dtype=out_dtype)
    x = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"patch_euler: x must be a floating-point tensor, got torch.int64"):
        pf_kernels.patch_euler(x, x.float(), torch.zeros(1, 4), 2)


# ------------------------------------------------------------------ the feature classifier
@pytest.mark.parametrize("settings,message", [
    ({"test_frac": 1.5}, r"test_frac=1.5: expected a number in \[0, 1\)"),   # trained on 0 images, exit 0
    ({"test_frac": 1.0}, r"test_frac=1.0: expected a number in \[0, 1\)"),
    ({"test_frac": math.nan}, r"test_frac=nan: expected a number in \[0, 1\)"),
    ({"test_frac": -0.1}, r"test_frac=-0.1"),
    ({"epochs": 0}, r"epochs=0: expected an integer >= 1"),                 # wrote an untrained classifier
    ({"epochs": True}, r"epochs=True: expected an integer >= 1"),
    ({"batch_size": 0}, r"batch_size=0: expected an integer >= 1"),
    ({"lr": math.inf}, r"lr=inf: expected a finite number > 0"),
])
def test_classifier_settings_that_train_on_nothing_are_refused(settings, message):
    args = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "test_frac": 0.2, **settings}
    with pytest.raises(ValueError, match=message):
        check_training(**args)
    with pytest.raises(ValueError, match=message):
        train_classifier(torch.zeros(10, 1, 8, 8), torch.zeros(10, dtype=torch.long), 2, log=None, **args)
    with pytest.raises(ValueError, match=r"1 image\(s\) with test_frac=0.5 leave none to train on"):
        train_classifier(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), 2, epochs=1, test_frac=0.5,
                         log=None)
