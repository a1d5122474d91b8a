"""``key=value`` command lines (hydra's override syntax, without hydra's run directories).

``parse(defaults, argv)`` merges ``a.b=1 c=[x,y]`` into a copy of ``defaults``; an unknown
key stops with the list of known ones, and ``--help`` prints the defaults.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf


class UsageError(ValueError):
    """A bad command line (unknown key, not ``key=value``)."""


def _leaf_keys(cfg: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return keys


def parse(defaults: dict, argv: list[str], free: tuple[str, ...] = ()) -> DictConfig:
    """``defaults`` updated by ``argv``; keys under a prefix in ``free`` may be added (e.g. sampler params)."""
    known = _leaf_keys(defaults)
    items = []
    for arg in argv:
        arg = arg.lstrip("+")
        if "=" not in arg:
            raise UsageError(f"expected key=value, got {arg!r}; known keys: {', '.join(known)}")
        key = arg.split("=", 1)[0]
        if key not in known and not any(key.startswith(f"{p}.") for p in free) and not any(
                k.startswith(f"{key}.") for k in known):
            raise UsageError(f"unknown option {key!r}; known keys: {', '.join(known)}")
        items.append(arg)
    cfg = OmegaConf.create(defaults)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(items))


def run(main, defaults: dict, doc: str, free: tuple[str, ...] = (), argv: list[str] | None = None) -> int:
    """Parse, call ``main(cfg)``, turn expected errors into one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip() + "\n\ndefaults:\n" + OmegaConf.to_yaml(OmegaConf.create(defaults)))
        return 0
    from pf.data import DataError
    from pf.eval.inputs import InputError

    try:
        cfg = parse(defaults, argv, free)
        main(cfg)
    except (UsageError, FileNotFoundError, InputError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
