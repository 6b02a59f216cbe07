"""The sweeper: a Hydra multirun as Optuna studies, one concern per module.

    python train.py -m schedule=under,sweet,over                      # a 3-point grid, one study

- ``plugin``: :class:`~sweeper.sweep.plugin.StudySweeper`, the Hydra face; ``sweep()`` reads top to bottom.
- ``settings``: ``hydra.sweeper.*`` checked once into a frozen ``Settings``.
- ``command``: overrides -> checked points -> one study per dataset and model (each point composed once).
- ``preflight``: every check of a sweep point before GPU time.
- ``queue``: which trial next, under the cross-worker lock (claim, take, park, abandon, reclaim).
- ``loop``: one worker: claim, launch under a heartbeat and the stop signals, record.
- ``tell``: how a job ended, told to its trial.
- ``launchers``: the other workers, local processes or SLURM jobs.
- ``summary``: each study's report and the exit code.
- ``handle``: :class:`~sweeper.sweep.handle.TrialReporter`, the job's handle on its trial.

What a trial records is declared in ``sweeper.records``. Importing this package imports none of its modules.
"""
