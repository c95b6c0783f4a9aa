"""``lrzoo-train``: the Hydra app that runs a recipe (model × adapter × task × trainer × logger).

    lrzoo-train adapter=dora task=glue/rte trainer.lr=4e-4 task.data_dir=../shared/data
    lrzoo-train -m adapter=lora,dora,lora_xs task=glue/rte seed=0,1,2      # a sweep
    torchrun --nproc_per_node 2 -m lrzoo.cli.train experiment=demo          # DDP, one run dir

Each run gets its own directory, ``<output_root>/<task>/<model>/<adapter>/seed<seed>-<hash>``, where
``<hash>`` (:func:`lrzoo.runs.identity.run_hash`) digests the whole resolved configuration but the seed and
bookkeeping keys, plus the size and SHA-256 of every local data file the run reads: a sweep over any key never
mixes two configurations in one directory, an edited data file is a new run, every rank of a job and every
re-run of a command find the same one, and the seeds of one configuration share the hash. One process
writes a run directory at a time (:mod:`lrzoo.runs.lock`).

The config tree is ``recipes/`` (root ``config.yaml``); the ``adapter`` group is the top-level
``adapters/`` directory, registered into Hydra's ConfigStore at startup because its folder name
differs from the group's (:mod:`lrzoo.compose`). The run itself is :func:`lrzoo.train.recipe.run_recipe`,
which checks everything it needs before the first step; a mistake there is one line on stderr and exit
status 2 (:mod:`lrzoo.cli.errors`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from omegaconf import DictConfig

from ..compose import check_overrides, register_adapter_configs
from ..configs import config_dir
from ..errors import UserError
from ..runs import identity  # noqa: F401  (registers ${lrzoo.run_hash:}, which run_name interpolates)
from ..runs.files import RESULTS_FILE
from ..train.recipe import rank, run_recipe
from ..train.teardown import exit_rank, in_process_group, leave_process_group
from .errors import debugging, is_user_error, message, take_debug_flag


def _summary(results: dict[str, Any], run_dir: str) -> str:
    def shown(value: Optional[float], scale: float = 1.0, digits: int = 4) -> str:
        return "null (not finite: see nonfinite_metrics)" if value is None else f"{scale * value:.{digits}f}"

    metrics = ", ".join(f"{k}={shown(v)}" for k, v in results["metrics"].items() if k != "score")
    skipped = results.get("nonfinite_steps_skipped")
    return (f"[lrzoo] {results['task']} / {results['adapter']} / {results['model']} seed {results['seed']}: "
            f"{metrics}\n[lrzoo] {results['primary_metric']} = {shown(results['score'], 100, 2)}  "
            + (f"[{skipped} non-finite steps skipped] " if skipped else "") +
            f"({results['steps']} steps, {results['wall_time_s']:.0f} s, {results['train_tokens_per_s']:.0f} tokens/s); "
            f"results in {os.path.join(run_dir, RESULTS_FILE)}")


#: exit status of ``lrzoo-train`` when a run was refused (its input) / diverged; the worst of a sweep's runs wins
EXIT_REFUSED, EXIT_DIVERGED = 2, 1
_failures: list[int] = []


def _hydra_task(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig

    from lrzoo.train.divergence import DivergenceError

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        results = run_recipe(cfg, run_dir)
    except Exception as err:
        diverged = isinstance(err, DivergenceError)
        if debugging() or not (diverged or is_user_error(err)):
            raise  # a bug: Hydra prints its traceback
        # The message alone, as the last line of the output (lrzoo-sweep's failure line); no Hydra traceback
        # hint. In a sweep (-m) the other runs still go, and lrzoo-train exits non-zero at the end.
        print(f"[lrzoo] {err}" if diverged else f"lrzoo-train: error: {message(err)}", file=sys.stderr)
        _failures.append(EXIT_DIVERGED if diverged else EXIT_REFUSED)
        return None
    if results is None:
        if rank() == 0:
            print(f"[lrzoo] stopped early (trainer.stop_after); run the same command again to resume from {run_dir}")
        return None
    if rank() == 0:
        print(_summary(results, run_dir))
    return results["score"]


def main() -> None:
    """Console entry point of ``lrzoo-train`` (and ``python -m lrzoo.cli.train``, handy under ``torchrun -m`` /
    ``accelerate launch -m``). ``--debug`` shows the traceback of a refused configuration (as
    ``HYDRA_FULL_ERROR=1`` does)."""
    import hydra

    from .console import quiet_console

    sys.argv[1:] = take_debug_flag(sys.argv[1:])
    quiet_console()
    register_adapter_configs()
    try:
        check_overrides(sys.argv[1:])
    except UserError as err:
        if debugging():
            raise
        print(f"lrzoo-train: error: {message(err)}", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
    if rank() != 0:
        # One run directory for all ranks (hydra#2070): only rank 0 writes .hydra/ and the log.
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    app = hydra.main(config_path=str(config_dir("recipes")), config_name="config", version_base="1.3")(_hydra_task)
    try:
        app()
    except SystemExit as stop:  # Hydra exits 1 after printing a bug's traceback
        code = stop.code
    except BaseException:
        leave_process_group()
        raise
    else:
        code = max(_failures, default=0)
    if in_process_group():
        exit_rank(code)  # not an ordinary exit: see lrzoo.train.teardown
    sys.exit(code)


if __name__ == "__main__":
    main()
