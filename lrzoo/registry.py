"""The adapter registry: one name per method, the public contract of the project.

A method is registered once, in its own file under ``lrzoo/methods/``, with
:func:`register_adapter`. Everything else (``wrap``, the Hydra ``adapter`` group, the contract
tests, the benchmarks) looks methods up here by name.

Two kinds of entries exist:

* **lrzoo-native methods** (LoRA-XS, LoLDU, ...) give a config class derived from
  :class:`lrzoo.layer.AdapterConfig` and a layer class derived from
  :class:`lrzoo.layer.AdapterLayer`; registration turns them into a PEFT tuner with its own
  ``peft_type`` (see :mod:`lrzoo.peft_bridge`).
* **PEFT-native methods** (LoRA, LoRA+, DoRA, RandLoRA, ...) give a ``build_config`` callable that
  returns a stock PEFT config, so their checkpoints stay in PEFT's own format.

A method whose training differs from "AdamW on the trainable tensors, the configured schedule" names a
training procedure (``register_adapter(..., procedure="relora")``), a class of :data:`lrzoo.procedure.PROCEDURES`
written beside the method. What else depends on the method (how :func:`lrzoo.load` treats its checkpoints,
why :func:`lrzoo.export_lora` refuses it, its stock-PEFT twin for the benchmarks) is a hook on its
:class:`AdapterSpec`, so no code outside ``lrzoo/methods/`` compares a method's name.

**The record.** What lrzoo knows about how a prepared model trains is one typed attribute,
``model.lrzoo_record`` (:class:`TrainingRecord`: the method ``wrap`` used, its training options such as LoRA+'s λ or
ReLoRA's reset interval, a baseline's head and evaluate-only mark, the method's own ``method_state``), read with
:func:`record_of`. The trainer reads it once, when it builds the run's procedure, and passes the options on
explicitly; a user's ``lrzoo.make_optimizer(model, lr)`` after ``wrap`` takes the procedure and its defaults from it.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from peft import PeftConfig

from .registry_table import Table


@dataclass(frozen=True)
class AdapterSpec:
    """What the registry knows about one method."""

    name: str
    #: Builds the PEFT config from ``wrap``'s keyword arguments (already alias-resolved).
    build_config: Callable[..., PeftConfig]
    #: The lrzoo layer class for native methods, ``None`` for PEFT-native ones.
    layer_cls: Optional[type] = None
    #: ``wrap`` keyword -> config field, e.g. ``{"alpha": "lora_alpha"}`` for PEFT's LoraConfig.
    aliases: dict[str, str] = field(default_factory=dict)
    #: Defaults applied before the user's keywords, for methods without a packaged ``adapters/<name>.yaml``
    #: (a packaged file's keys win over these; see :func:`adapter_defaults`).
    defaults: dict[str, Any] = field(default_factory=dict)
    #: Training-procedure options ``wrap`` accepts but the layer does not (LoRA+'s λ, ReLoRA's
    #: reset interval...), with defaults; recorded on the model (:attr:`TrainingRecord.options`).
    training_defaults: dict[str, Any] = field(default_factory=dict)
    #: The training procedure the trainer runs for this method: a key of
    #: :data:`lrzoo.procedure.PROCEDURES` (``None``: the plain one).
    procedure: Optional[str] = None
    #: Called as ``post_wrap(peft_model, adapter_name)`` after injection (e.g. to tag the model).
    post_wrap: Optional[Callable[..., None]] = None
    #: One line for ``list_adapters(verbose=True)`` and error messages.
    summary: str = ""
    #: Why the method cannot train on a bitsandbytes-quantized base and what to do instead ("" = it can), or
    #: a function of one quantized target layer giving that reason for the layers it cannot handle.
    quantized_base_refusal: Union[str, Callable[[Any], str]] = ""
    #: ``export_problem(peft_model, adapter_name)``: why :func:`lrzoo.export_lora` cannot write this model's adapter
    #: as a LoRA file (ReLoRA after a reset), or ``None``. :func:`lrzoo.export_lora` asks every method.
    export_problem: Optional[Callable[[Any, str], Optional[str]]] = None
    #: ``foreign_folder(path)``: for a folder without ``adapter_config.json``, the message when this method saved
    #: it as something else than an adapter (ReLoRA's full model), or ``None``. :func:`lrzoo.load` asks every method.
    foreign_folder: Optional[Callable[[str], Optional[str]]] = None
    #: ``before_load(peft_config)``, ``after_load(peft_model, peft_config)``: run by :func:`lrzoo.load` around PEFT's
    #: loading for every checkpoint (the hook checks the config is its own: LoRA's fast layers for any ``LORA``
    #: checkpoint, RandLoRA's forward for a ``RANDLORA`` one).
    before_load: Optional[Callable[[PeftConfig], None]] = None
    after_load: Optional[Callable[[Any, PeftConfig], None]] = None
    #: ``peft_reference(**options)``: the stock PEFT config of the same method (PEFT's own layers), for the
    #: benchmarks' lrzoo-versus-PEFT rows; ``None`` when PEFT has no such method. Options: ``r``, ``alpha``,
    #: ``dropout``, ``target_modules``, ``task_type``.
    peft_reference: Optional[Callable[..., PeftConfig]] = None
    #: ``wrap`` keywords a benchmark adds so that an untrained layer does the work of a trained one
    #: (``{"init_lora_weights": False}``: B ≠ 0).
    bench_options: dict[str, Any] = field(default_factory=dict)


#: the per-method hooks ``register_adapter`` takes as keywords (fields of :class:`AdapterSpec`)
HOOKS = ("export_problem", "foreign_folder", "before_load", "after_load", "peft_reference", "bench_options")

_REGISTRY: Table[AdapterSpec] = Table("adapter", hint="Register new methods with lrzoo.register_adapter.")


def register_adapter(
    name: str,
    config_cls: Optional[type] = None,
    layer_cls: Optional[type] = None,
    *,
    build_config: Optional[Callable[..., PeftConfig]] = None,
    aliases: Optional[dict[str, str]] = None,
    defaults: Optional[dict[str, Any]] = None,
    training_defaults: Optional[dict[str, Any]] = None,
    post_wrap: Optional[Callable[..., None]] = None,
    summary: str = "",
    quantized_base_refusal: Union[str, Callable[[Any], str]] = "",
    procedure: Optional[str] = None,
    **hooks: Any,
) -> AdapterSpec:
    """Add a method to the registry and, for lrzoo-native methods, to PEFT.

    Args:
        name: lower-case registry name, e.g. ``"lora_xs"``.
        config_cls: an :class:`~lrzoo.layer.AdapterConfig` subclass (native methods).
        layer_cls: an :class:`~lrzoo.layer.AdapterLayer` subclass (native methods).
        build_config: for PEFT-native methods, a callable returning the PEFT config.
        aliases: ``wrap`` keyword -> config field renames.
        defaults: keyword defaults applied before the user's.
        training_defaults: training-procedure options (see :class:`AdapterSpec`).
        post_wrap: hook run on the new ``PeftModel``.
        summary: one-line description.
        quantized_base_refusal: why the method cannot run on a quantized base and the alternative
            (``wrap`` refuses such a base with it); empty when it can.
        procedure: the name of its training procedure in :data:`lrzoo.procedure.PROCEDURES`
            (``"relora"``, ``"lora_sb"``, ``"loraplus"``...); ``None`` for the plain one.
        hooks: the per-method hooks of :class:`AdapterSpec` (``export_problem``, ``foreign_folder``,
            ``before_load``, ``after_load``, ``peft_reference``, ``bench_options``).
    """
    unknown = sorted(set(hooks) - set(HOOKS))
    if unknown:
        raise TypeError(f"register_adapter({name!r}): unknown hook(s) {unknown}; known: {', '.join(HOOKS)}.")
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"Adapter names are lower-case identifiers, got {name!r}.")
    _REGISTRY.refuse_taken(name)  # before PEFT's tables learn the name
    if config_cls is not None:
        if layer_cls is None:
            raise ValueError(f"register_adapter({name!r}, config_cls, layer_cls): layer_cls is missing.")
        from .peft_bridge import register_native_method

        register_native_method(name, config_cls, layer_cls)
        build_config = config_cls
    elif build_config is None:
        raise ValueError(f"register_adapter({name!r}): give config_cls and layer_cls, or build_config.")
    spec = AdapterSpec(
        name=name,
        build_config=build_config,
        layer_cls=layer_cls,
        aliases=dict(aliases or {}),
        defaults=dict(defaults or {}),
        training_defaults=dict(training_defaults or {}),
        post_wrap=post_wrap,
        summary=summary or _first_line(config_cls.__doc__ if config_cls else ""),
        quantized_base_refusal=quantized_base_refusal,
        procedure=procedure,
        **{key: dict(value) if key == "bench_options" else value for key, value in hooks.items()},
    )
    return _REGISTRY.add(name, spec)


def unregister_adapter(name: str) -> AdapterSpec:
    """Remove a method added with :func:`register_adapter` and return its spec.

    For an lrzoo-native method this also takes its ``peft_type`` out of PEFT's tables, so afterwards
    ``wrap(model, name)`` fails with the list of known methods and its checkpoints no longer load (as
    before it was registered). Meant for tests and plugins that register a method for a while; models
    already wrapped with it keep working in memory. Unknown names fail like :func:`get_adapter`.
    """
    spec = get_adapter(name)
    if spec.layer_cls is not None:
        from .peft_bridge import unregister_native_method

        unregister_native_method(name)
    del _REGISTRY[name]
    return spec


@dataclass
class TrainingRecord:
    """What lrzoo records about how a model is trained: the one attribute lrzoo sets on a model it prepares
    (``model.lrzoo_record``, :data:`RECORD_ATTRIBUTE`; read it with :func:`record_of`).

    ``wrap`` writes it (method and options), a baseline (:mod:`lrzoo.train.baselines`) writes it (head, evaluate
    only), and a method's ``post_wrap`` may add what it must remember about the wrapped model (``method_state``).
    """

    #: the registry name ``wrap`` used; ``None`` for a model lrzoo did not wrap (a baseline)
    method: Optional[str] = None
    #: the method's training options (its spec's ``training_defaults`` keys: LoRA+'s λ, ReLoRA's reset interval...)
    options: dict[str, Any] = field(default_factory=dict)
    #: module names trained in full as the task head (baselines; a wrapped model's head is PEFT's modules_to_save)
    head_modules: tuple[str, ...] = ()
    #: the run trains nothing and is evaluated once (``adapter=zero_shot``)
    evaluate_only: bool = False
    #: what the method keeps about the wrapped model (ReLoRA: the values of the non-adapter weights at wrap)
    method_state: dict[str, Any] = field(default_factory=dict)


#: The attribute of a model that holds its :class:`TrainingRecord`.
RECORD_ATTRIBUTE = "lrzoo_record"


def record_of(model: Any) -> TrainingRecord:
    """The :class:`TrainingRecord` lrzoo set on ``model``; an empty one (no method) for a model it did not
    prepare. The record itself, not a copy: a ``post_wrap`` hook writes its ``method_state`` through it."""
    record = getattr(model, RECORD_ATTRIBUTE, None)
    return record if isinstance(record, TrainingRecord) else TrainingRecord()


def set_record(model: Any, record: TrainingRecord) -> TrainingRecord:
    """Set ``model``'s :class:`TrainingRecord` (``wrap`` and the baselines do)."""
    setattr(model, RECORD_ATTRIBUTE, record)
    return record


def record_training_options(model: Any, options: dict[str, Any]) -> None:
    """Record ``options`` (``{"method": name, **training options}``) on ``model``: what ``wrap`` does."""
    options = dict(options)
    record = record_of(model)
    set_record(model, TrainingRecord(method=options.pop("method", None), options=options,
                                     head_modules=record.head_modules, evaluate_only=record.evaluate_only,
                                     method_state=record.method_state))


def training_options(model: Any) -> dict[str, Any]:
    """A copy of the training options ``wrap`` recorded on ``model`` as ``{"method": name, **options}``, ``{}``
    when it was not wrapped by lrzoo (a baseline, a plain module)."""
    record = record_of(model)
    return {} if record.method is None else {"method": record.method, **record.options}


def _first_line(text: Optional[str]) -> str:
    return (text or "").strip().split("\n")[0]


def list_adapters() -> list[str]:
    """The registered adapter names, sorted."""
    return _REGISTRY.names(sort=True)


def adapter_specs() -> list[AdapterSpec]:
    """Every registered method's spec, by name (for code that asks each method's hooks: :func:`lrzoo.load`)."""
    return [_REGISTRY[name] for name in list_adapters()]


def get_adapter(name: str) -> AdapterSpec:
    """Look a method up by name; unknown names fail with the list of known ones."""
    return _REGISTRY.lookup(name)


def ignored_options(name: str) -> tuple[str, ...]:
    """The ``wrap`` options of method ``name`` that would not change what it computes: ``("alpha",)`` for a
    layer without a scale (``uses_alpha = False``: SALT, SVFit), else ``()``.

    ``wrap`` refuses them. ``lrzoo-train`` drops them from the adapter node and from the run's hash with a
    notice instead, since its experiment presets set ``alpha`` for every adapter.
    """
    layer_cls = get_adapter(name).layer_cls
    return () if getattr(layer_cls, "uses_alpha", True) else ("alpha",)


def adapter_defaults(name: str) -> dict[str, Any]:
    """The defaults of method ``name``: what ``lrzoo.wrap(model, name)`` uses for every option not given.

    The single source is the method's ``adapters/<name>.yaml`` (shipped in the wheel as
    ``lrzoo/configs/adapters``), the same file the Hydra recipes load as ``adapter=<name>``, so the
    two entry points cannot drift apart. Its keys (``r``, ``alpha``, ``dropout``, training options...)
    are ``wrap`` keywords; ``name`` is left out. A method registered without such a file (a
    third-party :func:`register_adapter` call) gets its registration's ``defaults``; for a
    packaged one the file's keys win over them.
    """
    spec = get_adapter(name)
    return {**copy.deepcopy(spec.defaults), **copy.deepcopy(_packaged_defaults(spec.name))}


@functools.lru_cache(maxsize=None)
def _packaged_defaults(name: str) -> dict[str, Any]:
    from .configs import config_dir

    path = config_dir("adapters") / f"{name}.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf  # the loader Hydra uses for adapter=<name>: the same values

    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if data.pop("name", name) != name:
        raise ValueError(f"{path} declares another adapter's name; its `name:` must be {name!r}.")
    return data
