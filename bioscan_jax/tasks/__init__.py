"""Tasks: each module has ``run(config, workdir) -> dict`` (the summary it also writes)."""

import importlib

#: Task name (``config.task``) -> module in this package.
TASKS: dict[str, str] = {
    "barcodebert": "bioscan_jax.tasks.barcodebert",
    "clibd": "bioscan_jax.tasks.clibd",
    "zsc": "bioscan_jax.tasks.zsc",
}


def run(config, workdir: str) -> dict:
    """Runs ``config.task`` in ``workdir``; unknown or not-yet-available tasks raise clearly."""
    name = config.task
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    try:
        module = importlib.import_module(TASKS[name])
    except ModuleNotFoundError as e:
        if e.name == TASKS[name]:
            raise NotImplementedError(f"Task {name!r} is not implemented in this version of bioscan-jax") from e
        raise
    return module.run(config, workdir)
