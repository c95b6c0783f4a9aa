"""The lab: tuned comparisons run from sweep plans, and the reports read back from finished runs
(docs/architecture.md). It reads runs through :mod:`lrzoo.runs`, composes their configs with :mod:`lrzoo.compose`,
scores with :mod:`lrzoo.tasks.metrics`, and never imports the trainer's internals or PEFT.

* :mod:`~lrzoo.lab.plan`: plan files and the runs a plan composes; :mod:`~lrzoo.lab.choice`: what happened to each
  run and the rates a cell chooses; :mod:`~lrzoo.lab.sweep`: the sweep driver (``lrzoo-sweep``);
* :mod:`~lrzoo.lab.table` and :mod:`~lrzoo.lab.report`: the plain report; :mod:`~lrzoo.lab.tuned`: the tuned
  tables (``lrzoo-report --plan``), with :mod:`~lrzoo.lab.intervals` (bootstrap) and :mod:`~lrzoo.lab.plot`
  (matplotlib, the ``lab`` extra);
* :mod:`~lrzoo.lab.results_docs`: the generated blocks of docs/ (``make results-docs``).
"""
