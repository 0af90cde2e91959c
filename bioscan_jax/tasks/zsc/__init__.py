"""BIOSCAN-ZSC: zero-shot clustering of frozen image, DNA and image+DNA embeddings.

``task`` runs the benchmark, ``encoders`` parses the encoder specs and builds each model,
``embedding_cache`` embeds once per model and reuses the files, ``evaluation`` clusters, scores
and plots, ``steps`` names the train steps (CLIBD's, BarcodeBERT's) the memory planner compiles.
"""

from bioscan_jax.tasks import TaskSpec
from bioscan_jax.tasks.zsc import steps, task

SPEC = TaskSpec(name="zsc", run=task.run, check_config=task.check_config,
                stages=steps.STAGES, step=steps.step)
