"""What every experiment driver shares (``make exp``, ``make study``, ``make tune`` and the bench).

Layering: `pumer_lightning.measure` (the primitives: one FLOP counter, one interleaved timer) <- ``lab`` <- the
drivers. A driver that needs something another driver has moves it down here instead of copying it; nothing
here imports a driver. One idea per module:

* `pumer_lightning.lab.stats`: accuracy with standard errors, paired differences, both over training seeds.
* `pumer_lightning.lab.score`: score a schedule on a split, through the task's own validation code, with every
  example's score, loss and type (one evaluation ``Trainer``).
* `pumer_lightning.lab.compare`: FLOPs per example and interleaved timing of N schedules on one model.
* `pumer_lightning.lab.context`: device, the precision/autocast map, an experiment's configs into `PumerCLI`.
* `pumer_lightning.lab.machine`: the one description of machine, software and commit.
* `pumer_lightning.lab.report`: percentages, Markdown tables from rows, a record's header.
* `pumer_lightning.lab.cache`: content hashes and the append-only JSON-lines store.

Task weights from a Lightning checkpoint load through `pumer_lightning.models.checkpoint.load_task_weights`
(below the tasks, so that the distillation teacher uses it too), which always checks the recorded architecture.
"""
