"""What the benchmarks build for a method, asked of its registration (``AdapterSpec``), never of its name:
the stock-PEFT reference (``peft_reference``: the same method with PEFT's own layers, for the lrzoo-versus-PEFT
rows) and the ``wrap`` keywords that make an untrained layer do a trained one's work (``bench_options``)."""

from __future__ import annotations

from typing import Any


def has_peft_reference(method: str) -> bool:
    """Whether stock PEFT has ``method``, so that the benchmarks give it a PEFT row beside lrzoo's."""
    import lrzoo

    return lrzoo.get_adapter(method).peft_reference is not None


def peft_reference_config(method: str, **options: Any):
    """Stock PEFT's config of ``method`` (options: ``r``, ``alpha``, ``dropout``, ``target_modules``,
    ``task_type``); refuses a method PEFT does not have."""
    import lrzoo

    reference = lrzoo.get_adapter(method).peft_reference
    if reference is None:
        raise ValueError(f"stock PEFT has no {method!r} (its AdapterSpec has no peft_reference): no PEFT row to build.")
    return reference(**options)


def bench_options(method: str) -> dict[str, Any]:
    """The ``wrap`` keywords the benchmarks add for ``method`` (LoRA's ``init_lora_weights=False``: B ≠ 0)."""
    import lrzoo

    return dict(lrzoo.get_adapter(method).bench_options)
