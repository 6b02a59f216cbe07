"""sft-sweep: Hydra config groups compose supervised fine-tuning runs, an Optuna study holds them, and each
trial is a TRL ``SFTTrainer`` run. Import the modules themselves (``sweeper.trial``, ``sweeper.plan``, ...); the
package exports nothing."""

__all__: list[str] = []
