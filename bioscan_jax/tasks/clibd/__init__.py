"""CLIBD: contrastive alignment of image, DNA and taxonomy-text towers; retrieval evaluation.

``task`` runs a benchmark and writes the report, ``training`` prepares the data and towers and
trains them, ``evaluation`` embeds the splits and scores the retrieval, ``steps`` is the train step the
memory planner compiles.
"""

from bioscan_jax.tasks import TaskSpec
from bioscan_jax.tasks.clibd import steps, task, training

SPEC = TaskSpec(name="clibd", run=task.run, check_config=training.check_config,
                train=training.train_clibd, load=training.load_towers,
                stages=steps.STAGES, step=steps.step)
