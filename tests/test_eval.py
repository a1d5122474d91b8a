"""pf.eval: metrics through torch-fidelity behave like distances, the classifier extractor
registers and gives features of the right shape, inputs round-trip, missing weights are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity")

from pf import cli  # noqa: E402
from pf.encoders.classifier import ClassifierMissing, save_classifier, train_classifier  # noqa: E402
from pf.eval.classifier import EXTRACTOR_NAME, classifier_extractor_class, register_classifier_extractor  # noqa: E402
from pf.autoencoder import from_uint8, to_uint8  # noqa: E402
from pf.eval.inputs import ImageSet, InputError, load_folder, load_npz, save_folder, save_npz  # noqa: E402
from pf.eval.metrics import MissingWeights, compute_metrics, resolve_extractor  # noqa: E402
from pf.pipeline import generate  # noqa: E402

FAST = dict(kid_subsets=10, batch_size=512, device="cpu")


@pytest.fixture(scope="module")
def digits8():
    """The embedded digits at 8x8: uint8 (1797, 1, 8, 8) and labels."""
    from omegaconf import OmegaConf

    from pf.eval.inputs import load_dataset_images

    cfg = OmegaConf.create({"name": "digits", "path": None, "labels_path": None, "image_size": 8, "channels": 1,
                            "num_classes": 10, "scale_factor": 1.0})
    return load_dataset_images(cfg)


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory, digits8):
    """A briefly trained classifier (a few seconds): enough for features that see noise."""
    images, labels = digits8
    torch.set_num_threads(1)
    model, info = train_classifier(from_uint8(images), labels, 10, epochs=8, width=16, seed=0, log=None)
    path = tmp_path_factory.mktemp("clf") / "clf.pt"
    save_classifier(path, model, info, data="digits@8")
    return path, info


def _noised(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    x = from_uint8(images)
    return to_uint8(x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))


def test_classifier_learns_digits(classifier_file):
    _, info = classifier_file
    assert info["test_size"] == 359 and info["train_size"] == 1797 - 359
    assert info["test_accuracy"] > 0.8  # 8 epochs of a width-16 CNN; the default recipe reaches ~98%


def test_fid_kid_prc_against_itself_and_noised_copies(digits8, classifier_file):
    images = digits8[0][:600]
    path, _ = classifier_file
    same = compute_metrics(images, images, weights=path, **FAST)
    assert abs(same["fid"]) < 1e-2
    assert same["precision"] == pytest.approx(1.0) and same["recall"] == pytest.approx(1.0)
    noisy = [compute_metrics(_noised(images, s), images, weights=path, **FAST) for s in (0.1, 0.4, 1.0)]
    fids = [m["fid"] for m in noisy]
    # KID is the unbiased MMD estimate: a set against itself comes out slightly negative
    # (the cross term counts each image with itself); it must still order the noise levels.
    kids = [same["kid"]] + [m["kid"] for m in noisy]
    assert fids[0] > 10 * max(same["fid"], 1e-4)
    assert fids == sorted(fids) and fids[2] > 2 * fids[0], fids
    assert kids == sorted(kids) and kids[3] > 10 * abs(kids[0]), kids
    assert noisy[2]["precision"] < same["precision"] and noisy[2]["recall"] < same["recall"]
    assert noisy[2]["precision"] < noisy[0]["precision"]
    for m in noisy:
        assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
        assert m["num_generated"] == 600 and m["num_reference"] == 600


def test_fid_of_a_shifted_copy_is_large(digits8, classifier_file):
    images = digits8[0][:400]
    shifted = torch.roll(images, shifts=2, dims=-1)
    assert compute_metrics(shifted, images, weights=classifier_file[0], prc=False, **FAST)["fid"] > 1.0


def test_extractor_registers_and_gives_features_of_the_right_shape(classifier_file):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert register_classifier_extractor() == EXTRACTOR_NAME
    assert register_classifier_extractor() == EXTRACTOR_NAME  # a second call is a no-op
    cls = classifier_extractor_class()
    assert FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME] is cls
    ext = cls(EXTRACTOR_NAME, ["penultimate", "logits"], feature_extractor_weights_path=str(classifier_file[0]))
    for size in (8, 16, 13):  # other sizes are resized to the classifier's
        x = torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8)
        feats, logits = ext(x)
        assert feats.shape == (5, 64) and logits.shape == (5, 10)  # width 16 -> 4 * 16 features
        assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
    grey = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(ext(grey.expand(-1, 3, -1, -1))[0], ext(grey)[0])  # RGB-repeated grey == grey
    assert cls.get_default_feature_layer_for_metric("fid") == "penultimate"
    with pytest.raises(ValueError, match="uint8"):
        ext(torch.zeros(2, 3, 8, 8))


def test_missing_weights_name_the_option(tmp_path, digits8):
    images = digits8[0][:50]
    with pytest.raises(MissingWeights, match="feature_extractor_weights_path"):
        compute_metrics(images, images, extractor="inception", **FAST)
    with pytest.raises(MissingWeights, match="feature_extractor_weights_path"):
        compute_metrics(images, images, extractor="inception", weights=tmp_path / "nope.pth", **FAST)
    with pytest.raises(MissingWeights, match="feature_extractor_weights_path.*|train_classifier"):
        resolve_extractor("classifier", tmp_path / "nope.pt")
    with pytest.raises(ClassifierMissing, match="pf.eval.train_classifier"):
        classifier_extractor_class()(EXTRACTOR_NAME, ["penultimate"], feature_extractor_weights_path=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        resolve_extractor("vgg", None)


def test_cli_reports_errors_in_one_line(tmp_path, capsys, classifier_file):
    from pf.eval.__main__ import DEFAULTS, main

    save_npz(tmp_path / "s.npz", torch.zeros(20, 1, 8, 8, dtype=torch.uint8))
    assert cli.run(main, DEFAULTS, "doc", argv=[f"generated={tmp_path / 's.npz'}", "extractor=inception"]) == 2
    assert "feature_extractor_weights_path" in capsys.readouterr().err
    assert cli.run(main, DEFAULTS, "doc", argv=["generated=x", "bogus=1"]) == 2
    assert "unknown option 'bogus'" in capsys.readouterr().err
    assert cli.run(main, DEFAULTS, "doc", argv=[f"generated={tmp_path / 'missing'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    out = tmp_path / "r.json"
    argv = [f"generated={tmp_path / 's.npz'}", "data.image_size=8", f"feature_extractor_weights_path={classifier_file[0]}",
            "kid_subsets=5", "metrics=[fid,kid]", f"out={out}"]
    assert cli.run(main, DEFAULTS, "doc", argv=argv) == 0
    import json

    result = json.loads(out.read_text())
    assert result["fid"] > 1.0 and "precision" not in result and result["num_reference"] == 1797


def test_inputs_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    for c in (1, 3):
        images = torch.randint(0, 256, (7, c, 8, 8), dtype=torch.uint8, generator=g)
        save_npz(tmp_path / f"a{c}.npz", images)
        assert torch.equal(load_npz(tmp_path / f"a{c}.npz"), images)
        save_folder(tmp_path / f"f{c}", images)
        assert torch.equal(load_folder(tmp_path / f"f{c}"), images)
        item = ImageSet(images)[0]
        assert item.shape == (3, 8, 8) and item.dtype == torch.uint8
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(InputError, match="uint8"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(InputError, match="no .*images"):
        load_folder(tmp_path)  # holds only .npz files and folders
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]


def test_generate_same_seed_same_images_any_batch_size():
    from model_helpers import tiny_model

    from pf.samplers import EulerPF

    model = tiny_model(dtype=torch.float32, in_channels=1)
    a, info = generate(model, EulerPF(), 12, 3, seed=5, batch_size=12)
    b, _ = generate(model, EulerPF(), 12, 3, seed=5, batch_size=5)
    c, _ = generate(model, EulerPF(), 12, 3, seed=6, batch_size=12)
    assert a.shape == (12, 1, 8, 8) and a.dtype == torch.uint8 and info["nfe"] == 3
    assert (a.int() - b.int()).abs().max() <= 1  # batch-size-dependent float rounding at most one level
    assert not torch.equal(a, c)


@pytest.mark.slow
def test_inception_runs_offline_from_a_local_weights_file(tmp_path):
    """The Inception path end to end with a local file (random weights: no download, no network)."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.set_num_threads(1)  # faster on a shared CPU
    torch.save({}, tmp_path / "empty.pth")
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with mock.patch("torch.hub.load_state_dict_from_url", side_effect=AssertionError("tried to download")):
        # precision/recall only: FID's 2048x2048 matrix square root would add many seconds on a CPU
        m = compute_metrics(x, x, extractor="inception", weights=tmp_path / "inception.pth", fid=False, kid=False,
                            **FAST)
    assert m["extractor"] == "inception" and m["precision"] == 1.0 and m["recall"] == 1.0
