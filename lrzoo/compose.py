"""A run's config from ``lrzoo-train``'s command line: the packaged recipes, the overrides checked before Hydra
composes them, the groups they select, and the composed config checked as ``lrzoo-train`` checks it.

Used by ``lrzoo-train`` (:mod:`lrzoo.cli.train`) and by the lab, which composes each run of a sweep plan exactly
as the command line would (:func:`compose_checked`); the schema of the keys is the trainer's
(:mod:`lrzoo.train.schema`), the one way from the lab into ``train/``.

Hydra's own answers to a mistyped override are several lines and sometimes the wrong advice: for
``trainer.lrr=1`` it says "To append to your config use +trainer.lrr=1", which the check of the composed
config (:func:`lrzoo.train.schema.check_keys`) then refuses; for ``adapter=lorra`` it lists every option on a
line of its own. :func:`check_overrides` answers both in one line with the closest known name. Keys the
schema knows but the YAMLs lack (``task.heldout_size``) keep Hydra's "+" advice; adapter and logger keys,
which depend on the option chosen, are checked once composed.

:func:`config_groups` also makes ``--help``'s list (``${lrzoo.config_groups:}`` in ``hydra.help.template``),
without ``recipes/sweeps/``: it holds ``lrzoo-sweep`` plans, not a group a run can select.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from .configs import config_dir
from .errors import UserError, did_you_mean

#: folders of recipes/ that are not config groups of lrzoo-train
NOT_GROUPS = ("sweeps",)
_SPELLING = "Fix the spelling (docs/recipes.md lists every key)."


def register_adapter_configs() -> None:
    """Store every ``adapters/*.yaml`` in Hydra's ConfigStore as option ``adapter=<stem>``."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for path in sorted(config_dir("adapters").glob("*.yaml")):
        store.store(group="adapter", name=path.stem, node=OmegaConf.load(path))


def config_groups() -> dict[str, list[str]]:
    """Group (``task``, ``task/glue``, ``experiment/paper/lora``...) -> its options, as Hydra's
    ``$APP_CONFIG_GROUPS`` lists them: the folders of ``recipes/`` but :data:`NOT_GROUPS`, and ``adapter``
    (``adapters/`` and ``recipes/adapter/``)."""
    root = config_dir("recipes")
    groups: dict[str, list[str]] = {"adapter": [p.stem for p in config_dir("adapters").glob("*.yaml")]}
    for path in root.rglob("*.yaml"):
        group = path.parent.relative_to(root).as_posix()
        if group != "." and group.split("/")[0] not in NOT_GROUPS:
            groups.setdefault(group, []).append(path.stem)
    return {group: sorted(options) for group, options in sorted(groups.items())}


def config_groups_help() -> str:
    return "\n".join(f"{group}: {', '.join(options)}" for group, options in config_groups().items())


def group_options() -> dict[str, list[str]]:
    """Top-level group -> what ``group=...`` accepts (``task`` -> ``glue/rte``, ..., ``commonsense/all``...)."""
    options: dict[str, list[str]] = {}
    for group, names in config_groups().items():
        top, _, rest = group.partition("/")
        options.setdefault(top, []).extend(f"{rest}/{name}" if rest else name for name in names)
    return options


def check_overrides(overrides: list[str]) -> None:
    """Refuse an override naming a key no node declares, or a group option that does not exist: a
    :class:`~lrzoo.errors.UserError` with the closest known name."""
    from .train.schema import FIXED_NODES, ROOT_KEYS, unknown_key

    groups = group_options()
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals or key.startswith(("+", "~", "-", "hydra")) or "@" in key or "/" in key:
            continue  # appended keys (checked once composed), deletions, Hydra's own, package/nested group syntax
        if key in groups:
            _check_option(key, value, groups[key])
            continue
        node, _, leaf = key.rpartition(".")
        known = ROOT_KEYS if node == "" else FIXED_NODES.get(node)
        if known is not None and leaf not in known:
            raise UserError(f"unknown config key {unknown_key(node, leaf, known)}: nothing reads it. {_SPELLING}")


def _check_option(group: str, value: str, options: list[str]) -> None:
    if "(" in value or "*" in value:  # a sweep function (choice(...), glob(...)): Hydra's to expand
        return
    for option in value.split(","):  # -m adapter=lora,dora
        option = option.strip()
        if option in options or option == "null":
            continue
        guess = did_you_mean(option, options)
        hint = f" (did you mean {group}={guess}?)" if guess else ""
        listed = f" The options: {', '.join(options)}." if len(options) <= 30 else ""
        raise UserError(f"{group}={option}: no such {group}{hint}.{listed}")


def compose_checked(overrides: list[str], what: str) -> Any:
    """The config ``lrzoo-train <overrides>`` runs (``lrzoo-sweep``'s runs), checked as ``lrzoo-train`` checks it:
    :func:`check_overrides`, Hydra's composition, :func:`lrzoo.train.schema.check_keys`. Any refusal is one
    :class:`~lrzoo.errors.UserError` line naming ``what``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .runs.identity import plain_config
    from .train.schema import check_keys

    register_adapter_configs()
    try:
        check_overrides(overrides)
        with initialize_config_dir(config_dir=str(config_dir("recipes")), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        check_keys(plain_config(cfg))
    except UserError as err:
        raise UserError(f"{what}: {err}") from err
    except (HydraException, OmegaConfBaseException) as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"{what}: {first}") from err
    return cfg


OmegaConf.register_new_resolver("lrzoo.config_groups", config_groups_help, replace=True)
