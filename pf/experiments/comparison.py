"""The comparison's shared settings: the data, recipe, evaluation and classifier that every study
on its trained runs (``reproduce``, ``findings``, ``repa``) starts from, the arms it trains, and
which settings a stage sees (what its key hashes).

A study adds its own settings on top of :data:`DEFAULTS` (``reproduce``: the arms it compares,
the trend and the error profile; ``findings``: the findings; ``repa``: the REPA arm), so the
studies share their trained runs and evaluated points by key.
"""

from __future__ import annotations

DEFAULTS = {
    "out_dir": "runs/study",          # trained runs, sampled images, the classifier (large; recomputable)
    "records_dir": "results/study",   # stage records and evaluated points (small JSON, kept in git)
    "figures": "docs/study",          # plots and sample grids
    "device": "auto",                 # auto | cpu | cuda
    "jobs": 1,                        # worker processes (2 on this 2-core machine)
    "threads": 1,                     # torch threads per worker
    "data": "fashion_mnist",          # a pf/configs/data option with a test split
    "data_overrides": [],             # e.g. [data.path=/my/fashion-mnist]
    "image_size": 16,
    "model": "tiny",
    "train": {
        "steps": 3000,
        "batch_size": 64,
        "lr": 1.0e-3,
        "warmup_steps": 100,
        "seeds": [0, 1],
        "keep_every": 500,            # checkpoints kept along each trajectory
        "overrides": [],              # more pf.train overrides for every arm
    },
    "eval": {
        "num_samples": 1000,          # per point (one sampler, K and seed)
        "batch_size": 500,
        "seeds": [0, 1, 2],           # sampling seeds, paired across columns
        "nfe": [10, 25, 50, 100],     # Euler's K; the adaptive samplers at the K of matched NFE
        "cfg_scale": 1.0,             # SPEC: FID without guidance
        "dual_loop": {"p": 0.4, "n_inner": 4},
        "look_ahead": {"p": 0.4, "context_t_ratio": 1.4},
        "kid_subsets": 50,
        "reference_size": None,       # null: the whole test split; a number: its first images (toy runs)
        "compile": True,              # torch.compile the model for sampling (about 2x on this CPU)
        "grid_steps": 50,             # Euler K (and matched NFE) of the sample grid
    },
    "classifier": {"epochs": 10, "width": 32, "lr": 3.0e-3},
    "toy": False,                     # a minute-sized run of everything (CI)
    "report_only": False,             # rewrite the report from what is stored; run nothing
}
# ``toy=true`` stands for these (a minute-sized run of everything, CI).
TOY = ["out_dir=runs/toy", "records_dir=runs/toy/records", "train.steps=4", "train.keep_every=2", "train.batch_size=8",
       "train.warmup_steps=1", "eval.num_samples=20", "eval.batch_size=10", "eval.seeds=[0,1]", "eval.nfe=[2,4]",
       "eval.kid_subsets=2", "eval.compile=false", "eval.grid_steps=4", "eval.reference_size=200",
       "classifier.epochs=1", "classifier.width=4", "image_size=8"]
# Settings under which any key may be given (a sampler's parameters).
FREE = ("eval.dual_loop", "eval.look_ahead")

# The arms of the comparison: pf.train overrides on top of the shared recipe.
ARMS = {
    "sit_uniform": {"label": "SiT (uniform t)", "overrides": ["trainer=fm", "trainer.timesteps.name=uniform"]},
    "sit_logit_normal": {"label": "SiT (logit-normal t)",
                         "overrides": ["trainer=fm", "trainer.timesteps.name=logit_normal"]},
    "pf_ltg": {"label": "PF (LTG)", "overrides": ["trainer=pf", "trainer.timesteps.name=ltg"]},
    "pf_logit_normal": {"label": "PF (one logit-normal t per sample)",
                        "overrides": ["trainer=pf", "trainer.timesteps.name=logit_normal"]},
}
# SiT's own samplers for its global-time arms (SPEC section 13), each with the parameters it draws
# with: SiT's sampling script's defaults (the SDE's diffusion "sigma", norm 1, the drift-only last
# step of 0.04), given explicitly so that a point names them and a later change of a default in
# pf.samplers makes a new point, not a stale one.
SIT_SAMPLERS = {"euler": {}, "heun": {},
                "sde": {"diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step_size": 0.04}}
SAMPLER_LABELS = {"euler": "Euler", "euler_pf": "Euler", "dual_loop": "dual-loop", "look_ahead": "look-ahead",
                  "heun": "Heun", "sde": "SDE"}  # heun, sde: the SiT baseline's own samplers (SPEC 13)


def is_pf(arm_overrides: list[str]) -> bool:
    """Whether a run of these overrides is a per-patch-time (PF) model."""
    return "trainer=fm" not in arm_overrides


def euler_sampler(arm_overrides: list[str]) -> str:
    """The Euler sampler a run of these overrides draws with: ``euler_pf`` for a PF model."""
    return "euler_pf" if is_pf(arm_overrides) else "euler"


# Keys of any study on the comparison that decide which stages exist, or how a study runs and
# reports, never what one stage computes: a stage does not see them, so they are not part of its
# key (changing the trend's steps or adding an arm re-runs nothing that is done).
LAYOUT_KEYS = ("arms", "jobs", "threads", "results", "figures", "page", "findings", "repa")
LAYOUT_EVAL_KEYS = ("samplers", "adaptive_train_seeds", "trend_steps", "trend_arms", "profile_times",
                    "profile_images")


def stage_study(study: dict, *, keep: tuple[str, ...] = (), keep_eval: tuple[str, ...] = (),
                evaluation: bool = True) -> dict:
    """The part of ``study`` a stage may see (and its key hashes): without the layout keys but
    those in ``keep`` / ``keep_eval``; ``evaluation=False`` (training stages) also without the
    evaluation and classifier settings."""
    out = {k: v for k, v in study.items() if k not in LAYOUT_KEYS or k in keep}
    if not evaluation:
        out.pop("eval", None)
        out.pop("classifier", None)
    elif "eval" in out:
        out["eval"] = {k: v for k, v in out["eval"].items() if k not in LAYOUT_EVAL_KEYS or k in keep_eval}
    return out
