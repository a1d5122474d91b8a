"""Shared test setup.

Without a GPU the Triton kernels run in the Triton interpreter. ``@triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is decorated, i.e. when ``pf_kernels`` is first imported,
so it is set here, before any test module imports the package.

Every test is marked ``compat`` except those in the files of ``SAME_ON_EVERY_STACK``:
``scripts/compat_check.sh`` runs ``-m compat`` on the oldest supported stack (Python 3.12,
torch 2.11, Triton 3.6), i.e. what differs between stacks (kernels, compile, the compiled
extension, models, checkpoints), not the whole suite a second time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test files whose outcome does not depend on the torch, Triton or Python release: they test
# plain Python, data handling, reports and CLI plumbing, and reach torch only through ops
# whose results every supported release defines alike. Each says why. A file not listed here
# (a new one included) is in the compatibility pass.
SAME_ON_EVERY_STACK = {
    "test_adm_eval.py": "ADM's metric arithmetic and pf.eval plumbing (torch-fidelity's Inception, not our models)",
    "test_bad_values.py": "host-side value checks before any kernel or sampler step runs",
    "test_captions.py": "caption text, templates and shard reading",
    "test_cli.py": "the key=value parser of the entry points",
    "test_cli_errors.py": "one-line messages for bad command-line input",
    "test_data.py": "datasets, folders and loaders",
    "test_encode.py": "latent-set files written by pf.data.encode (a stand-in autoencoder)",
    "test_eval.py": "metric plumbing of pf.eval (torch-fidelity, not our models)",
    "test_evidence.py": "the evidence study's stages, keys, budget and report (its models: test_models)",
    "test_findings.py": "the study's statements over stored records",
    "test_flow.py": "the probability path: tensor arithmetic",
    "test_gpu_study.py": "the study's device-call plumbing (plans, deadlines, returned files), rehearsed",
    "test_inpaint.py": "inpainting masks, files and kept patches through the samplers (the networks: test_models)",
    "test_layers.py": "the import map, read from the source",
    "test_mnist_format.py": "IDX file parsing",
    "test_repa_study.py": "the REPA study's stages and report",
    "test_reproduce.py": "the reproduction study's stages and report",
    "test_sample_cli.py": "pf.sample's files and arguments",
    "test_samplers.py": "sampler arithmetic (the networks they call: test_models)",
    "test_scheduled.py": "per-patch schedules and kept patches: sampler arithmetic (the networks: test_models)",
    "test_sit_samplers.py": "Heun / SDE arithmetic and their command plumbing (the networks: test_models)",
    "test_stages.py": "stage keys and caching of the studies",
    "test_study_framework.py": "the study framework: stages, caching, curves, reports",
    "test_t2i_sampling.py": "text conditions through the samplers (the network: test_t2i_model)",
    "test_tree_size.py": "the size of the tracked files",
    "test_train_options.py": "the trainer's options (schedules, accumulation, loss scaling, logging, data, warm "
                             "starts): plain torch ops and files (FSDP, which differs: test_train_fsdp)",
}


def pytest_collection_modifyitems(config, items):
    compat = pytest.mark.compat
    for item in items:
        if item.path.name not in SAME_ON_EVERY_STACK:
            item.add_marker(compat)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_backend():
    """Force ``pf_kernels`` onto its Triton kernels for one test (interpreter on the CPU)."""
    import pf_kernels

    with pf_kernels.use_backend("triton"):
        yield


@pytest.fixture
def one_thread():
    """Two busy cores: one intra-op thread avoids oversubscription (and keeps runs comparable).
    Training tests use it for the whole module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
