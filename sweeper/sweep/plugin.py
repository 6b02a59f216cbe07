"""The Hydra face of the sweep: :class:`StudySweeper`, behind ``hydra_plugins.sft_sweep.SftSweepSweeper``.

    python train.py -m schedule=under,sweet,over                      # a 3-point grid
    python train.py -m 'lr.learning_rate=tag(log,interval(1e-5,3e-4))' hydra.sweeper.n_trials=6

:meth:`StudySweeper.sweep` reads top to bottom: the settings checked once (``settings``), the command's points
checked and its studies opened (``command``, ``preflight``), the start line of each study and the workers
planned (``queue``, ``launchers``), the workers started, this process's own loop over the queue (``loop``,
``tell``) or, with SLURM, watching the jobs; once the other workers have ended, the trials they left queued (a
worker stopped mid-trial) run here; then each study's summary and the exit code (``summary``). Bad input
is one line (``sweeper.config.InputError``) before any trial exists, and a study the command created for it is
deleted again (``command.drop_new``). Nothing in the package imports this module.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import datasets
from hydra.core.plugins import Plugins
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, open_dict, read_write
from omegaconf.errors import MissingMandatoryValue

from sweeper import config as config_mod
from sweeper import interrupt, passwords, tracking
from sweeper.sweep import command as command_mod
from sweeper.sweep import launchers, loop, summary
from sweeper.sweep.command import Command
from sweeper.sweep.queue import Queue
from sweeper.sweep.settings import Settings, new_sweep_id, parse

__all__ = ["StudySweeper"]

log = logging.getLogger(__name__)


class StudySweeper:
    """Implementation behind ``hydra_plugins.sft_sweep.SftSweepSweeper``: its fields are the plugin schema's
    (``hydra.sweeper.*``), checked when the sweep starts."""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        self.sweep_id = new_sweep_id()  # shared by the workers this sweep starts

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        passwords.install_log_filter(passwords.secret_values(  # the command's log lines and worker logs
            dict(config.hydra.job.get("env_set") or {}), self.fields.get("storage")))
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Any]:
        settings, command, queue = self._prepare(arguments)
        interrupt.honour()  # a Ctrl-C swallowed while the data was prepared: nothing is started
        workers = launchers.start(settings, command, queue)
        returns = loop.run(settings, queue, self.launcher, self.config, workers.stop) if workers.works_here else []
        if not workers.finish():
            return returns  # SLURM jobs that run on, unwatched
        if workers.works_here and queue.has_work():  # a worker stopped mid-trial left its retry in the queue
            log.warning("the other workers ended with trials left in the queue; running them here")
            returns += loop.run(settings, queue, self.launcher, self.config, workers.stop)
        summary.write(command, settings.storage_url)
        tracking.close_study(self.config, [sw.study for sw in command.sweeps], command.folder)  # the study runs
        if workers.works_here and settings.leads:  # the command's first process: the workers it started have ended
            summary.fail_if_work_left(command, settings.sweep_id)  # exit code 1, one line
        summary.fail_if_nothing_completed(command, settings.sweep_id)
        return returns

    def _prepare(self, arguments: list[str]) -> tuple[Settings, Command, Queue]:
        """Settings, the command's checked studies and its queue, the start lines and the workers' plan; bad
        input as one line, no trial created."""
        command = None
        try:
            datasets.disable_progress_bars()  # one sweep bar and one bar per trial, nothing nested
            # the checks below may import bitsandbytes (through TRL and PEFT), whose CPU backend warns as it loads
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
            # Hydra's launcher says "Launching 1 jobs locally" and "#N : <overrides>" for every trial, which
            # repeats the sweep's own "trial N: <overrides>" line
            logging.getLogger("hydra._internal.core_plugins.basic_launcher").setLevel(logging.WARNING)
            settings = parse(self.fields, self.config, self.sweep_id)
            compose = command_mod.Composer(self.hydra_context.config_loader, self.config)
            command = command_mod.prepare(settings, compose, arguments)
            # Hydra's launcher makes the sweep folder of the unswept config, which may name no study (or not
            # resolve: data=jsonl data.train_path=a.jsonl,b.jsonl leaves data.train_path ??? there): the
            # command's folder instead, where its summary goes
            with read_write(self.config), open_dict(self.config):
                self.config.hydra.sweep.dir = str(command.folder)
            queue = Queue(settings, command)
            command.plan = launchers.plan(settings, command, queue.start_lines())
            return settings, command, queue
        except (ValueError, FileNotFoundError) as e:
            if command is not None:  # refused after its studies were opened: the ones it created go again
                command_mod.drop_new(command, settings.storage_url)
            raise config_mod.InputError.wrap(e) from e
        except MissingMandatoryValue as e:
            if command is not None:
                command_mod.drop_new(command, settings.storage_url)
            raise config_mod.InputError(config_mod.missing_line([e.full_key])) from None
        except ConfigCompositionException as e:
            raise _whole_value(e, arguments) from e.__cause__


def _whole_value(e: ConfigCompositionException, arguments: list[str]) -> ConfigCompositionException:
    """Hydra's refusal of an unknown key, met composing one point of the sweep (``schedule.max_step=4`` of
    ``schedule.max_step=4,6``), with the value the command gave instead of the point's, so that its did-you-mean
    (:func:`sweeper.config.one_line`) keeps the whole sweep; any other error as it is."""
    m = re.match(r"Could not override '([^']+)'\.\nTo append to your config use \+\1=[^\n]*", str(e))
    given = {a.lstrip("+~").split("=", 1)[0]: a.split("=", 1)[1] for a in arguments if "=" in a}
    if not m or m[1] not in given:
        return e
    return ConfigCompositionException(f"Could not override '{m[1]}'.\nTo append to your config use "
                                      f"+{m[1]}={given[m[1]]}{str(e)[m.end():]}")
