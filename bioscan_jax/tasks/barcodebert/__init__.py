"""BarcodeBERT: masked k-mer pretraining → species fine-tuning → linear and 1-NN probes.

``task`` runs the stages and writes the report, ``finetune`` is the species fine-tuning stage,
``evaluation`` the probes and the fine-tuned accuracy, ``steps`` the train steps the memory
planner compiles; the pretraining stage is the shared
:func:`bioscan_jax.train.stages.pretrain_mlm`.
"""

from bioscan_jax.tasks import TaskSpec
from bioscan_jax.tasks.barcodebert import steps, task

SPEC = TaskSpec(name="barcodebert", run=task.run, check_config=task.check_config,
                stages=steps.STAGES, step=steps.step)
