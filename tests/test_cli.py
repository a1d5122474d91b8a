"""pf.cli, the key=value parser of every entry point: merging, unknown keys, types, verbatim values."""

import pytest

from pf import cli

DEFAULTS = {"steps": 10, "scale": 1.5, "name": "euler", "flag": False, "prompt": None, "sampler": {"params": {}},
            "grid": {"rows": 2, "cols": [1, 2]}}


def test_values_merge_over_the_defaults_with_their_types():
    cfg = cli.parse(DEFAULTS, ["steps=25", "scale=2", "flag=true", "grid.cols=[3,4]", "+name=heun"])
    assert (cfg.steps, cfg.scale, cfg.flag, list(cfg.grid.cols), cfg.name) == (25, 2, True, [3, 4], "heun")
    assert cfg.grid.rows == 2 and DEFAULTS["steps"] == 10  # the defaults are copied, not changed


@pytest.mark.parametrize("argv, message", [
    (["bogus=1"], "unknown option 'bogus'"),
    (["steps"], "expected key=value"),
    (["steps=abc"], "steps='abc': expected an integer"),
    (["flag=3"], "expected true or false"),
    (["grid.cols=5"], "expected a list"),
])
def test_a_bad_command_line_is_one_usage_error(argv, message):
    with pytest.raises(cli.UsageError, match=message):
        cli.parse(DEFAULTS, argv)


def test_free_prefixes_take_new_keys_and_verbatim_keys_stay_strings():
    cfg = cli.parse(DEFAULTS, ["sampler.params.ratio=0.5", "prompt=7"], free=("sampler.params",))
    assert cfg.sampler.params.ratio == 0.5 and cfg.prompt == 7  # read as a value
    cfg = cli.parse(DEFAULTS, ["prompt=7", "steps=3"], verbatim=("prompt",))
    assert cfg.prompt == "7" and cfg.steps == 3
    assert cli.parse(DEFAULTS, ["prompt=a seven, then: an eight"], verbatim=("prompt",)).prompt == "a seven, then: an eight"


def test_run_gives_help_and_one_error_line(capsys):
    assert cli.run(lambda cfg: None, DEFAULTS, "the doc", argv=["--help"]) == 0
    assert "the doc" in capsys.readouterr().out
    assert cli.run(lambda cfg: None, DEFAULTS, "doc", argv=["bogus=1"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown option 'bogus'")
    seen = []
    assert cli.run(seen.append, DEFAULTS, "doc", argv=["steps=4"]) == 0 and seen[0].steps == 4  # main gets the parsed cfg
