"""Check the command line before Hydra starts a run: bad input -> one line, exit 2, nothing written.

Hydra's own errors are correct but span many lines (search paths, stack-trace hints);
this composes the same config first and reports the first problem in one line that names
the key and the fix. Sweeps (``-m a=1,2``) are checked on every group choice and on the
first combination of values (an Optuna ``interval(lo, hi)``: on ``lo``).
"""
from __future__ import annotations

from pathlib import Path

from memtl.errors import ConfigError

HYDRA_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--version",
               "--shell-completion", "-sc", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun"}
PREFIX = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~", "CHANGE": ""}


def preflight(argv: list[str], conf_dir: Path, config_name: str = "train") -> None:
    if any(a.split("=")[0] in HYDRA_FLAGS for a in argv):
        return  # help / info / cfg printing: Hydra's business
    multirun = ("-m", "--multirun")
    for a in argv:
        if a.startswith("-") and a not in multirun:
            script = f"{config_name}.py"
            takes = "-m (a sweep) and key=value overrides" if config_name == "train" else "key=value overrides"
            raise ConfigError(f"unknown option {a}: {script} takes {takes}; see python {script} --help")
    overrides = [a for a in argv if not a.startswith("-")]
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise ConfigError(f"cannot parse the command line: {_one_line(str(e))}") from None

    first: list[str] = []
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra/") and not o.is_delete():  # hydra/launcher=slurm, hydra/sweeper=...
            choices = _hydra_choices(key, conf_dir)
            if o.is_sweep_override():
                raise ConfigError(f"{key}: one option per command, not a sweep; choose one of {', '.join(choices)}")
            value = o.get_value_element_as_str()
            if value not in choices:
                raise ConfigError(f"unknown {key} '{value}': choose one of {', '.join(choices)}")
            first.append(f"{PREFIX.get(o.type.name, '')}{key}={value}")  # composed below: its defaults must load
            continue
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if isinstance(o.value(), IntervalSweep):  # an Optuna search space: check its lower end
            values = [str(o.value().start)]
        else:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        group_dir = conf_dir / key
        if group_dir.is_dir() and not o.is_delete():
            choices = sorted(str(p.relative_to(group_dir).with_suffix("")) for p in group_dir.rglob("*.yaml"))
            picked = o.value() if not o.is_sweep_override() and isinstance(o.value(), list) else values
            for v in picked:  # a list selects several configs of the group: callbacks=[default,meft_recon]
                if str(v) not in choices and v not in ("null", None):
                    raise ConfigError(f"unknown {key} '{v}': choose one of {', '.join(choices)}")
        value = values[0] if values else ""
        first.append(f"{PREFIX.get(o.type.name, '')}{key}" + ("" if o.is_delete() and not value else f"={value}"))

    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name, overrides=first)
    except Exception as e:  # Hydra/OmegaConf composition errors: same text, one line
        message = _unknown_key(str(e), first, conf_dir, config_name) or _one_line(str(e))
        if "Could not find 'hydra/sweeper/optuna" in message:
            message += " (the Optuna sweeper is an optional extra: pip install -e '.[optuna]')"
        if "Could not find 'hydra/launcher/submitit" in message:
            message += " (the submitit launcher is an optional extra: pip install -e '.[cluster]')"
        raise ConfigError(message) from None

    if config_name == "train":
        from memtl.run import validate

        validate(cfg)
    m = next((i for i, a in enumerate(argv) if a in multirun), None)
    if m is not None and 0 < m < len(argv) - 1:  # Hydra's argparse takes one run of overrides
        raise ConfigError(f"{argv[m]} in the middle of the overrides: put it first (python train.py -m key=a,b ...)")
    _check_run_dir(parsed, multirun=m is not None)


def _check_run_dir(parsed, multirun: bool) -> None:
    """The folder Hydra will create must be creatable: else Hydra fails with a traceback."""
    import os

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = next((o.get_value_element_as_str() for o in reversed(parsed) if o.key_or_group == key), None)
    # the default (outputs/..., multirun/...) and an interpolated value: check up to the first ${
    path = Path((given or ("multirun/x" if multirun else "outputs/x")).split("${")[0] or ".").expanduser()
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        what = "is not a folder" if not parent.is_dir() else "is not writable"
        raise ConfigError(f"{key}={given or path}: cannot create the run folder ({parent} {what}); "
                          f"set {key} to a folder you can write")


def _hydra_choices(group: str, conf_dir: Path) -> list[str]:
    """The options of a Hydra group (hydra/launcher): this project's files and the installed plugins'."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports hydra_plugins.*: their configs register in the ConfigStore
    try:
        stored = ConfigStore.instance().list(group)
    except OSError:  # no plugin registers this group
        stored = []
    mine = [p.stem for p in (conf_dir / group).glob("*.yaml")]
    return sorted({*mine, *(n[:-5] for n in stored if n.endswith(".yaml"))})


def _unknown_key(message: str, overrides: list[str], conf_dir: Path, config_name: str) -> str | None:
    """A typo in a key: name the valid keys of its parent instead of suggesting '+key'."""
    import re

    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, OmegaConf

    m = re.search(r"Could not override '([^']+)'", message)
    if not m:
        return None
    key = m.group(1)
    parent, _, leaf = key.rpartition(".")
    rest = [o for o in overrides if o.lstrip("+~").split("=")[0] != key]
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(config_name, overrides=rest)
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or leaf in node:
        return None  # the key exists: a different problem (e.g. a wrong type)
    return f"unknown key '{key}': the keys under '{parent or '<root>'}' are {', '.join(sorted(node.keys()))}"


def _one_line(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines()]
    keep = [ln for ln in lines if ln and not ln.startswith(("full_key", "object_type", "reference_type",
                                                             "Config search path", "provider=", "See https"))]
    return " ".join(keep)
