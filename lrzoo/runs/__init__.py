"""A run's identity and the files it leaves: the floor between the trainer, which writes a run, and the lab,
which reads runs back (docs/architecture.md).

* :mod:`~lrzoo.runs.identity`: the configuration a run computes from and the digests that name it (config hash,
  run directory hash, a plan's run key);
* :mod:`~lrzoo.runs.data`: which data a run reads and the fingerprint of its files;
* :mod:`~lrzoo.runs.files`: the names of a run directory's files, and reading ``results.json`` back;
* :mod:`~lrzoo.runs.lock`: one writer per run directory, and no leftovers from an interrupted one.
"""
