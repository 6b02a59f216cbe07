"""Run one fine-tuning trial; with -m, sweep many into an Optuna study. The checkout's form of the
installed ``sft-sweep`` command (the same arguments, the same helper commands).

    python train.py                                   # one run on the defaults (tiny model, demo data)
    python train.py -m schedule=under,sweet,over      # 500 / 1500 / 3000 steps, one study
    python train.py -m 'lr.learning_rate=tag(log,interval(1e-5,3e-4))' hydra.sweeper.n_trials=6
    python train.py --config-dir ./myconf -m data=mydata   # your groups beside conf/
"""

from sweeper.cli import main

if __name__ == "__main__":
    main()
