r"""Runs one bioscan-jax experiment, chosen by its config.

  python run.py --config=configs/barcodebert.py
  python run.py --config=configs/barcodebert.py:paper --config.data.manual_dir=/data/bioscan5m
  python run.py --config=configs/clibd.py --workdir=/ckpt/clibd

The config's ``task`` names a package in ``bioscan_jax.tasks`` whose spec's ``run(config, workdir)``
does the work and returns a summary dict.
"""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bioscan_jax import compilation_cache, config_errors, malloc_tuning, tasks, xla_cpu
from bioscan_jax import checkpoint
from bioscan_jax.train import loop
from bioscan_jax import sharding as mesh_lib
from bioscan_jax.train import multihost
from bioscan_jax.train import workdir_lock

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config(arg)).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and reports go here (default: config.workdir).")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback of an input or config error "
                               "instead of its one-line message.")

#: Errors that are about the user's input, config or workdir: their message names the cause and
#: the remedy, so run.py prints that one line (``--traceback`` for the whole trace).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               workdir_lock.WorkdirBusyError, workdir_lock.WorkdirError, loop.NonFiniteLossError,
               checkpoint.DiskFullError,
               # the train step plans more memory than the devices have (checked before the first
               # step, bioscan_jax/train/loop.py: check_step_fits): the setting to change
               loop.StepDoesNotFitError)


def _parse_flags(argv):
    """absl's flag parsing, with one line instead of chained tracebacks for a bad --config.x=y."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - config_flags raises AttributeError/KeyError/ValueError/flags.Error
        sys.exit(f"run.py: {config_errors.one_line(e)}")


def main(argv):
    del argv
    # Our modules log at INFO; the libraries' absl chatter (orbax, TFDS) only from WARNING.
    std_logging.getLogger("absl").setLevel(std_logging.WARNING)
    xla_cpu.apply_defaults()  # before any JAX computation: XLA reads XLA_FLAGS when its backend starts
    malloc_tuning.configure()  # before the backend starts its threads (logs what it did)
    compilation_cache.enable()  # a rerun loads its compiled programs from disk
    from tensorflow_datasets.core.utils import tqdm_utils  # no TensorFlow import

    tqdm_utils.disable_progress_bar()
    # Multi-process runs (TPU pod, several GPU hosts, python -m bioscan_jax.launch): join the
    # other processes before anything touches a JAX backend, then check they share the config.
    mesh_lib.maybe_initialize_distributed()
    config = _CONFIG.value
    multihost.assert_same_config(config)
    workdir = _WORKDIR.value or config.get("workdir") or f"workdirs/{config.task}"
    logging.info("task=%s workdir=%s", config.task, workdir)
    import jax

    try:
        # Every value in range (lr finite and > 0, probabilities in [0, 1], ...) and each training
        # stage's batch, mesh and schedule settings sound, named by their full path: seconds, not
        # a NaN loss after the data are built.
        config_errors.check_config(config)
        # Then the task's own checks (stages, label columns, encoder specs, ...), still before any data.
        tasks.get(config.task).check_config(config)
        # One writer per workdir (process 0 holds the lock for a multi-process run); a workdir that
        # is a file or not writable fails here, before any data are built.
        with workdir_lock.hold(workdir, enabled=jax.process_index() == 0):
            tasks.run(config, workdir)
    except loop.TrainingInterrupted as e:
        print(f"run.py: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except USER_ERRORS as e:
        if _TRACEBACK.value:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"run.py: {first}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=_parse_flags)
