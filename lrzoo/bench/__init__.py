"""Benchmarks (docs/benchmarks.md): :mod:`~lrzoo.bench.timing` (round-robin timing, paired ratios, saved bytes),
:mod:`~lrzoo.bench.layers` (one adapted linear per method against eager PEFT, ``lrzoo-bench``),
:mod:`~lrzoo.bench.model` (one training step of a whole model, ``lrzoo-bench --model``) and
:mod:`~lrzoo.bench.gpu_check` (everything that needs CUDA, ``make gpu-check``). Entry points: :mod:`lrzoo.cli`.
"""
