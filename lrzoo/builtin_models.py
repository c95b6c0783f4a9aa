"""The names of the built-in models (:data:`lrzoo.models.BUILTIN_MODELS`), without torch.

``model.source`` is a built-in name before it is a directory (the loader checks the name first), so the run
hash (:mod:`lrzoo.runs.model_source`, which imports no torch) needs the names to tell ``model.source=minilm``
(the wheel's model, hashed as spelled) from a local directory. ``lrzoo.models`` refuses to import when its table
and this list differ.
"""

from __future__ import annotations

NAMES = frozenset({"minilm", "smollm2_135m", "tiny_bert", "tiny_llama", "scratch_llama"})
