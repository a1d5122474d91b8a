"""Text-to-image training and sampling end to end at toy size: ``experiment=t2i_demo`` with the
real MiniLM encoder on the captioned digits; caption dropout, exact resume, two-rank DDP, the
pictures, checkpoints that know their encoder, and ``pf.sample prompt=...``."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("transformers")

import pf.train as pf_train  # noqa: E402
import train_helpers  # noqa: E402
from child_env import child_env  # noqa: E402
from pf.conditioning import TextCond  # noqa: E402
from pf.models import PatchForcingT2I, load_checkpoint  # noqa: E402
from pf.models.checkpoint import read_checkpoint_file  # noqa: E402
from pf.conditioning import TextConditioning  # noqa: E402
from pf.training.schema import ConfigError, fill_family_defaults  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAST = ["experiment=t2i_demo", *train_helpers.BASE, "trainer.warmup_steps=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(*overrides: str):
    return train_helpers.make_cfg(*overrides, base=FAST)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_the_demo_experiment_composes():
    cfg = make_cfg()
    assert cfg.model.family == "t2i" and cfg.model.name == "PFT2I-Tiny" and cfg.data.name == "captioned_digits"
    assert cfg.trainer.timesteps.name == "ltg" and cfg.trainer.timesteps.loc == 0.5  # SPEC section 11
    assert cfg.text.name == "minilm" and cfg.text.dropout == 0.1


def test_text_models_train_with_ltg_at_loc_one_half_unless_told(tmp_path):
    # SPEC section 11: LTG with loc 0.5 for text-to-image; the class model keeps LTG's own 0.7
    pf_train.train(make_cfg("trainer.timesteps.loc=null", "trainer.max_steps=1", "data.val_size=0"), tmp_path / "a")
    assert OmegaConf.load(tmp_path / "a" / "config.yaml").trainer.timesteps.loc == 0.5
    assert fill_family_defaults(make_cfg("trainer.timesteps.loc=0.3")).trainer.timesteps.loc == 0.3
    class_cfg = train_helpers.make_cfg(base=[])
    assert fill_family_defaults(class_cfg).trainer.timesteps.loc is None


def test_trains_resumes_exactly_and_samples(tmp_path):
    common = ["trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.keep_every=2", "trainer.val_every=4",
              "trainer.sample_every=4"]
    full = pf_train.train(make_cfg(*common), tmp_path / "full")
    assert type(full["model"]) is PatchForcingT2I and full["model"].text_dim == 384  # MiniLM's width
    recs = records(tmp_path / "full")
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and "val_loss" in recs[-1] and recs[-1]["nll"] != 0
    assert (tmp_path / "full" / "samples" / "step_000004.png").is_file()
    # the checkpoint knows its text encoder (pf.sample rebuilds it from there)
    ckpt = read_checkpoint_file(tmp_path / "full" / "checkpoints" / "last.pt")
    assert ckpt["train_config"]["text"]["name"] == "minilm" and ckpt["model_class"] == "PatchForcingT2I"

    pf_train.train(make_cfg(*common[1:], "trainer.max_steps=2"), tmp_path / "part")
    resumed = pf_train.train(make_cfg(*common, f"resume={tmp_path / 'part'}"), tmp_path / "part")
    assert [(r["step"], r["loss"]) for r in records(tmp_path / "part")] == [(r["step"], r["loss"]) for r in recs]
    for a, b in zip(full["ema"].state_dict().values(), resumed["ema"].state_dict().values()):
        assert torch.equal(a, b)

    # pf.sample: prompts in, a captioned grid out; the same noise and prompt give the same image
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\n\nthe digit 3\n")
    out = tmp_path / "samples"
    args = [sys.executable, "-m", "pf.sample", f"ckpt={tmp_path / 'full' / 'checkpoints' / 'last.pt'}",
            f"prompts={prompts}", "n=4", "steps=2", "sampler=dual_loop", f"out={out}", "progress=false", "viz=true"]
    proc = subprocess.run(args, cwd=ROOT, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NFE" in proc.stdout and len(list(out.glob("*.png"))) == 2  # the grid and the viz strip
    one = subprocess.run([*args[:4], 'prompt=a handwritten seven', *args[5:]], cwd=ROOT,
                         env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]


def test_caption_dropout_draws_the_empty_prompt():
    calls = []

    def encoder(prompts):
        calls.append(list(prompts))
        return TextCond(torch.ones(len(prompts), 2, 3), torch.ones(len(prompts), 2, dtype=torch.bool))

    torch.manual_seed(0)
    part = TextConditioning(encoder, dropout=0.3)
    part(["a seven"] * 2000, torch.device("cpu"))
    dropped = sum(p == "" for p in calls[-1]) / 2000
    assert 0.25 < dropped < 0.35  # the configured rate
    part.fixed(["a seven"] * 10, torch.device("cpu"))
    assert calls[-1] == ["a seven"] * 10  # validation and pictures: never dropped
    assert part.null(torch.device("cpu")).tokens.shape[0] == 1 and calls[-1] == [""]
    with pytest.raises(ValueError, match=r"text.dropout must lie in \[0, 1\)"):
        TextConditioning(encoder, dropout=1.0)


@pytest.mark.parametrize("overrides,error,message", [
    (["model=tiny"], ValueError, r"data=captioned_digits has captions: train it with a text model"),
    (["data=digits"], ValueError, r"data=digits has no captions: a text model .* needs data=captioned_digits"),
    (["trainer=fm"], ConfigError, r"model=t2i-\* is a Patch Forcing model: it needs trainer=pf"),
    (["model.family=dit"], ConfigError, r"model.name='PFT2I-Tiny' with model.family='dit'"),
    (["text.name=bert"], ConfigError, r"text.name='bert': expected one of minilm, t5, clip, qwen3vl, auto"),
    (["text.name=t5"], Exception, r"text.path"),
])
def test_bad_t2i_settings_stop_before_training(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        pf_train.train(make_cfg("trainer.max_steps=1", *overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_prompts_are_read_as_typed():
    from pf import sample

    cfg = sample.parse_args(["ckpt=x.pt", "prompt=7"])
    assert cfg["prompt_list"] == ["7"]  # the text "7", not the number
    assert sample.parse_args(["ckpt=x.pt", "prompt=a seven: handwritten"])["prompt_list"] == ["a seven: handwritten"]


def test_sample_errors_name_the_problem(tmp_path):
    cfg = make_cfg("trainer.max_steps=1", "trainer.sample_every=100")
    pf_train.train(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [([f"ckpt={ckpt}"], r"a text-to-image checkpoint samples prompts: give prompt="),
             ([f"ckpt={ckpt}", f"prompts={empty}"], r"holds no prompt"),
             ([f"ckpt={ckpt}", "prompt=a seven", "classes=[1]"], r"classes= is for class-conditional"),
             ([f"ckpt={ckpt}", "prompt=x", f"prompts={empty}"], r"not both")]
    from test_cli_errors import _run_forked  # each case its own process, torch imported once

    (tmp_path / "stderr").mkdir()
    results = _run_forked([["-m", "pf.sample", *args, f"out={tmp_path}"] for args, _ in cases], tmp_path / "stderr")
    for (args, pattern), (code, stderr) in zip(cases, results):
        lines = [ln for ln in stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, stderr[-1500:])
        import re

        assert re.search(pattern, lines[0]), (args, lines[0])


def test_two_rank_ddp_keeps_ranks_identical(tmp_path):
    import torch.multiprocessing as mp
    from test_train import _ddp_worker, _free_port

    cfg = make_cfg("trainer.max_steps=2", "trainer.ckpt_every=2", "trainer.val_every=2", "trainer.sample_every=100")
    mp.spawn(_ddp_worker, args=(2, _free_port(), OmegaConf.to_yaml(cfg), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert type(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")) is PatchForcingT2I


def test_the_recognition_experiment_end_to_end(tmp_path):
    from pf import cli
    from pf.experiments import t2i
    from pf.experiments.command import expand_toy

    argv = expand_toy(["toy=true", f"out_dir={tmp_path / 'out'}", f"records_dir={tmp_path / 'rec'}",
                       f"page={tmp_path / 't2i.md'}", f"figures={tmp_path / 'fig'}"], t2i.TOY)
    t2i.main(cli.parse(t2i.DEFAULTS, argv), argv=["toy=true"])
    page = (tmp_path / "t2i.md").read_text()
    assert "python -m pf.experiments.t2i toy=true" in page and "| held-out prompts | 60 x 1 |" in page
    assert "| training captions |" in page and "pending" not in page and (tmp_path / "fig" / "samples.png").is_file()
    # a rerun computes nothing: every stage is read back
    t2i.main(cli.parse(t2i.DEFAULTS, argv), argv=["toy=true"])
    assert (tmp_path / "t2i.md").read_text().split("## Stages")[0] == page.split("## Stages")[0]


def _captioned_files(root: Path, n: int = 6) -> tuple[Path, Path]:
    """A caption folder (images + captions.jsonl) and one webdataset shard of the same pictures."""
    import io
    import tarfile

    from PIL import Image

    folder, shard = root / "folder", root / "shards" / "000000.tar"
    folder.mkdir(parents=True)
    shard.parent.mkdir()
    gen = torch.Generator().manual_seed(0)
    lines = []
    with tarfile.open(shard, "w") as tar:
        for i in range(n):
            pixels = torch.randint(0, 256, (8, 8, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
            lines.append(json.dumps({"file": f"{i}.png", "caption": f"picture number {i}"}))
            for name, data in ((f"s{i:03d}.png", (folder / f"{i}.png").read_bytes()),
                               (f"s{i:03d}.txt", f"picture number {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder, shard


def test_caption_folder_and_shards_train(tmp_path):
    # issue 27, finding 3: both crashed with "'CaptionFolder' object has no attribute 'num_classes'",
    # the README's text-to-image torchrun command (data=caption_shards) included
    folder, shard = _captioned_files(tmp_path)
    small = ["trainer.max_steps=1", "trainer.batch_size=2", "data.image_size=8", "data.num_workers=0",
             "sampler.num_images=1", "sampler.steps=1"]
    out = pf_train.train(make_cfg(*small, "data=caption_folder", f"data.path={folder}", "data.val_size=2"),
                         tmp_path / "folder_run")
    assert out["summary"]["steps"] == 1 and math.isfinite(out["summary"]["final_loss"])

    # the README's command, its model, encoder and path swapped for toy ones
    readme = (ROOT / "README.md").read_text()
    line = next(ln for ln in readme.replace("\\\n", " ").splitlines() if "data=caption_shards" in ln and "torchrun" in ln)
    overrides = [a for a in shlex.split(line)[3:] if "=" in a and not a.startswith("--")]
    swapped = {"model": "model=t2i-tiny", "text.name": "text.name=minilm", "text.path": "text.path=null",
               "data.path": f"data.path={shard}", "hydra.run.dir": None}
    overrides = [swapped.get(a.split("=")[0], a) for a in overrides]
    assert "data=caption_shards" in overrides
    out = pf_train.train(make_cfg(*small, *[a for a in overrides if a]), tmp_path / "shard_run")
    assert out["summary"]["steps"] == 1 and math.isfinite(out["summary"]["final_loss"])
