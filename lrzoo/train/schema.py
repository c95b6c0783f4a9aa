"""The keys every node of ``lrzoo-train``'s config may hold, declared once, and the check that refuses any other.

A mistyped key is worse than a crash: ``+model.quantisation=nf4`` or ``+train_limt=16`` would be carried
along and ignored, and the run would train in full precision, or on every row, with exit code 0. So the
composed config is checked before anything loads, and every key a recipe reads is declared here:

* the fixed nodes as dataclasses (:class:`RunConfig` for the root, :class:`ModelConfig`, :class:`TaskConfig`,
  and :class:`~lrzoo.train.config.TrainerConfig` / :class:`~lrzoo.train.config.EvalConfig` for ``trainer`` and
  ``eval``): their fields are the keys, with the meaning in a comment;
* the nodes whose keys depend on the option chosen, from what builds them: ``adapter`` from ``lrzoo.wrap``'s
  keywords, the method's config class and its defaults (a GaLore/Fira ``adapter`` from the optimizer's
  options, a baseline's from nothing but ``name``), ``logger`` from the logger class's keywords.

Unknown keys are a :class:`lrzoo.errors.UserError` naming each one with its closest known key.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import UserError, did_you_mean
from .config import EvalConfig, TrainerConfig

#: adapter keys experiment presets set for every adapter, meaningless to a low-rank optimizer (GaLore/Fira) and
#: to a baseline: accepted there, and the run says it ignores them
ADAPTER_ONLY_KEYS = ("r", "alpha", "dropout")


@dataclass
class RunConfig:
    """The root of ``lrzoo-train``'s config (``recipes/config.yaml``)."""

    model: dict = field(default_factory=dict)
    adapter: dict = field(default_factory=dict)
    task: dict = field(default_factory=dict)
    trainer: dict = field(default_factory=dict)
    logger: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    seed: int = 0
    #: first N training rows (null: all)
    train_limit: Optional[int] = None
    #: first N rows of each eval set
    eval_limit: Optional[int] = None
    #: auto | never | <checkpoint dir>
    resume: str = "auto"
    output_root: str = "runs"
    run_name: str = ""
    #: Hydra's own node (present when the config comes from a Hydra job)
    hydra: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The ``model`` group (``recipes/model/*.yaml``), read by :func:`lrzoo.models.load_model`."""

    name: str = ""
    #: built-in name (lrzoo.models.BUILTIN_MODELS), local directory or hub id
    source: str = ""
    #: the adapter's target modules when ``adapter.target_modules`` is not set
    adapter_targets: Optional[list] = None
    #: fallback when neither trainer.max_length nor the task sets one
    max_length: Optional[int] = None
    dtype: Optional[str] = None
    #: none | nf4 | fp4 | int8
    quantization: str = "none"
    config_overrides: dict = field(default_factory=dict)
    #: an encoder's sentence representation for its classification head: cls | mean | pooler (null: the model's)
    pooling: Optional[str] = None
    #: how a sentence-pair similarity task (STS-B, MRPC, QQP) is scored: cross_encoder | bi_encoder (lrzoo.heads)
    similarity_head: Optional[str] = None
    #: how a bi-encoder's cosine is trained: cosine (CosineSimilarityLoss, MSE) | cosent (a ranking loss; lrzoo.heads)
    pair_loss: Optional[str] = None
    #: the text file a from-scratch model's tokenizer is trained on (model.source=scratch_llama; lrzoo.models)
    tokenizer_corpus: Optional[str] = None


@dataclass
class TaskConfig:
    """The ``task`` group (``recipes/task/**.yaml``); ``name`` picks :func:`lrzoo.tasks.get_task`."""

    name: str = ""
    #: the task's primary metric, as documentation: it must be the one the task is scored on
    metric: Optional[str] = None
    eval_split: Optional[str] = None
    max_length: Optional[int] = None
    #: null: the hub (offline: $LRZOO_DATA_DIR, then ../shared/data); else a folder in the ../shared/data layout
    data_dir: Optional[str] = None
    #: the task's decoding settings (trainer.generation overrides them)
    generation: dict = field(default_factory=dict)
    #: train on the union of these tasks' training splits
    train_tasks: Optional[list] = None
    #: score each of these sets (default: the task's own)
    eval_tasks: Optional[list] = None
    #: training rows held out as eval set heldout/<task> (absent from the task files: +task.heldout_size=N)
    heldout_size: Optional[int] = None
    #: null (the task's prompt) | question
    format: Optional[str] = None


def _fields(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


#: node -> its keys, for the nodes whose keys do not depend on the option chosen
FIXED_NODES: dict[str, frozenset[str]] = {
    "model": _fields(ModelConfig), "task": _fields(TaskConfig), "trainer": _fields(TrainerConfig) - {"seed"},
    "eval": _fields(EvalConfig),
}
ROOT_KEYS = _fields(RunConfig)


def adapter_keys(name: str) -> Optional[frozenset[str]]:
    """The keys ``adapter=<name>`` may hold; None when the method's options cannot be listed ahead of ``wrap``
    (a third-party method whose config builder needs arguments: ``wrap`` still refuses unknown ones)."""
    from ..optimizers import get_optimizer, list_optimizers
    from ..registry import adapter_defaults, get_adapter, list_adapters
    from .baselines import BASELINES

    if name in BASELINES:
        return frozenset({"name", *ADAPTER_ONLY_KEYS})
    from .parameterisations import PARAMETERISATIONS

    if name in PARAMETERISATIONS:  # SLTrain: options of the parameterisation (lrzoo.train.parameterisations)
        return frozenset({"name", *PARAMETERISATIONS[name].keys})
    if name in list_optimizers():
        spec = get_optimizer(name)
        accepted = [p for p in _keywords(spec.optimizer_cls) if p not in ("params", "lr", "weight_decay")]
        return frozenset({"name", "target_modules", *spec.group_defaults, *accepted, *ADAPTER_ONLY_KEYS})
    if name not in list_adapters():
        return None  # get_adapter's error (with its did-you-mean) comes when the run builds it
    spec = get_adapter(name)
    config_fields = _config_fields(name)
    if config_fields is None:
        return None
    from ..wrap import wrap

    wrap_keywords = [p for p in _keywords(wrap) if p not in ("model", "method")]
    return frozenset({"name", *wrap_keywords, *spec.aliases, *spec.training_defaults, *adapter_defaults(name),
                      *config_fields})


@functools.lru_cache(maxsize=None)
def _config_fields(name: str) -> Optional[frozenset[str]]:
    """The fields of the PEFT config class ``adapter=<name>`` builds (a throwaway default config tells it for
    builders that are functions)."""
    from ..registry import get_adapter

    builder = get_adapter(name).build_config
    cls = builder if dataclasses.is_dataclass(builder) else None
    if cls is None:
        try:
            cls = type(builder())
        except Exception:  # a builder that needs arguments: leave the check to wrap
            return None
    return _fields(cls) if dataclasses.is_dataclass(cls) else None


def logger_keys(name: str) -> Optional[frozenset[str]]:
    """The keys ``logger=<name>`` may hold: ``name`` and its logger's keywords (None: an unknown logger, refused
    by :func:`lrzoo.train.callbacks.make_logger`)."""
    from .callbacks import LOGGER_CLASSES

    # make_logger's table: the options after ``name`` are the class's keywords
    cls = LOGGER_CLASSES.get(name)
    if cls is None:
        return None
    return frozenset({"name", *(p for p in _keywords(cls) if p not in ("run_dir", "is_main"))})


def _keywords(function: Any) -> list[str]:
    return [p.name for p in inspect.signature(function).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]


def node_keys(plain: dict[str, Any]) -> dict[str, Optional[frozenset[str]]]:
    """Node (``""`` for the root) -> the keys it may hold in the config ``plain``."""
    keys: dict[str, Optional[frozenset[str]]] = {"": ROOT_KEYS, **FIXED_NODES}
    adapter, logger = plain.get("adapter"), plain.get("logger")
    keys["adapter"] = adapter_keys(adapter.get("name")) if isinstance(adapter, dict) else None
    keys["logger"] = logger_keys(logger.get("name")) if isinstance(logger, dict) else None
    return keys


def unknown_key(node: str, key: str, known: frozenset[str]) -> str:
    """``node.key`` and its closest known key, for the error message."""
    where = f"{node}.{key}" if node else key
    guess = did_you_mean(key, known)
    return f"{where} (did you mean {node + '.' if node else ''}{guess}?)" if guess else where


def check_keys(plain: dict[str, Any]) -> None:
    """Raise :class:`~lrzoo.errors.UserError` naming every key of the config ``plain`` (a resolved container)
    that no node declares, each with its closest known key."""
    problems = []
    for node, known in node_keys(plain).items():
        values = plain if node == "" else plain.get(node)
        if known is None or not isinstance(values, dict):
            continue
        problems += [unknown_key(node, key, known) for key in values if key not in known]
    if problems:
        options = "" if len(problems) > 1 else _known_line(problems[0], plain)
        raise UserError(f"unknown config key{'s' if len(problems) > 1 else ''} {'; '.join(problems)}: nothing reads "
                        f"{'them' if len(problems) > 1 else 'it'}, so the run would ignore it.{options} Fix the "
                        "spelling (docs/recipes.md lists every key).")


def _known_line(problem: str, plain: dict[str, Any]) -> str:
    node = problem.split(" ")[0].rpartition(".")[0]
    known = node_keys(plain).get(node)
    if not known:
        return ""
    if len(known) <= 24:
        return f" The {node or 'top-level'} keys: {', '.join(sorted(known - {'hydra'}))}."
    # an adapter backed by a PEFT config class: its own keys, then where the rest is described
    name = plain["adapter"].get("name")
    from ..registry import adapter_defaults

    own = sorted({"r", "alpha", "target_modules", *adapter_defaults(name)})
    return (f" adapter={name} takes {', '.join(own)} and the other fields of its PEFT config "
            f"(docs/adapters/{name}.md).")
