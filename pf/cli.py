"""The command-line parser of every ``key=value`` entry point (``pf.sample``, ``pf.eval``, ``pf.data.encode``,
``pf.eval.train_classifier``, the studies): hydra's override syntax, without hydra's run directories.

``parse(defaults, argv)`` merges ``a.b=1 c=[x,y]`` into a copy of ``defaults``; an unknown
key stops with the list of known ones, and ``--help`` prints the defaults. ``run`` adds the
one-line error policy of :mod:`pf.errors`. (``python -m pf.train`` parses with hydra itself,
``python -m pf.export`` with argparse for its documented ``--format``/``--out`` flags.)
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import DictConfig, OmegaConf

from pf.errors import run_command


class UsageError(ValueError):
    """A bad command line (unknown key, not ``key=value``)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the flag-style commands (``pf.export``, the device calls) whose bad command
    line is a :class:`UsageError` (one line under :func:`pf.errors.run_command`), not argparse's
    usage block and exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (python {self.prog.removeprefix('python ')} --help lists the options)")


def _leaf_keys(cfg: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return keys


def parse(defaults: dict, argv: list[str], free: tuple[str, ...] = (), verbatim: tuple[str, ...] = ()) -> DictConfig:
    """``defaults`` updated by ``argv``; keys under a prefix in ``free`` may be added (e.g. sampler
    params); a key in ``verbatim`` keeps its value as typed, a string (a prompt ``7`` is the text "7")."""
    known = _leaf_keys(defaults)
    items, as_typed = [], {}
    for arg in argv:
        arg = arg.lstrip("+")
        if "=" not in arg:
            raise UsageError(f"expected key=value, got {arg!r}; known keys: {', '.join(known)}")
        key, value = arg.split("=", 1)
        if key not in known and not any(key.startswith(f"{p}.") for p in free) and not any(
                k.startswith(f"{key}.") for k in known):
            raise UsageError(f"unknown option {key!r}; known keys: {', '.join(known)}")
        if key in verbatim:
            as_typed[key] = value
        else:
            items.append(arg)
    for item in items:  # a value YAML cannot read (``x=[1``) raises yaml's own error, not a ValueError
        try:
            OmegaConf.from_dotlist([item])
        except Exception as err:
            why = getattr(err, "problem", None) or " ".join(str(err).split())
            raise UsageError(f"{item}: the value does not parse ({why})") from None
    cfg = OmegaConf.merge(OmegaConf.create(defaults), OmegaConf.from_dotlist(items))
    for key, value in as_typed.items():
        OmegaConf.update(cfg, key, value, merge=False)
    for item in items:  # a value must have its default's type (when the default is not null)
        key = item.split("=", 1)[0]
        default, value = OmegaConf.select(OmegaConf.create(defaults), key), OmegaConf.select(cfg, key)
        _check_type(key, default, value)
    return cfg


def _check_type(key: str, default, value) -> None:
    if default is None or value is None:
        return
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, (str, int, float)) and not isinstance(value, bool), "a string"
    else:
        ok, want = True, ""
        if OmegaConf.is_list(default) or isinstance(default, list):
            ok, want = OmegaConf.is_list(value) or isinstance(value, list), "a list like [1,2]"
    if not ok:
        raise UsageError(f"{key}={value!r}: expected {want}")


def run(main, defaults: dict, doc: str, free: tuple[str, ...] = (), argv: list[str] | None = None) -> int:
    """Parse, call ``main(cfg)``; expected errors are one line on stderr and exit code 2 (``pf.errors``)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip() + "\n\ndefaults:\n" + OmegaConf.to_yaml(OmegaConf.create(defaults)))
        return 0
    return run_command(lambda: main(parse(defaults, argv, free)))
