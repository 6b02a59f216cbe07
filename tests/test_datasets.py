"""A sweep over datasets: one study per dataset and model, shared workers, one table of datasets.
Real CLI, real tiny model, real SQLite."""

from __future__ import annotations

import re

import optuna
import pytest

from sweeper.report import dataset_row, datasets_table, recommend, study_report

from .helpers import fast, run_in_process

TrialState = optuna.trial.TrialState
STUDIES = ["demo-tiny", "banking77_sample-tiny"]


def _storage(tmp_path):
    return f"sqlite:///{tmp_path}/optuna.db"


def _study(tmp_path, name):
    return optuna.load_study(study_name=name, storage=_storage(tmp_path))


def _names(tmp_path):
    return sorted(s.study_name for s in optuna.get_all_study_summaries(_storage(tmp_path)))


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _table_rows(text: str) -> dict[str, list[str]]:
    """The table of datasets in ``text``: dataset -> its cells."""
    section = text.split("## Step count per dataset", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")][1:]  # the header row out
    return {cells[0]: cells for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)}


@pytest.mark.slow
def test_a_sweep_over_datasets_runs_a_study_each_resumes_and_adds_only_new_datasets(tmp_path, cache_dir):
    base = [*fast("schedule.max_steps"), f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    out = _ok(run_in_process("-m", "schedule.max_steps=8,12", "data=demo,banking77_sample", *base))
    log = out.stdout + out.stderr
    assert _names(tmp_path) == sorted(STUDIES)
    for name, data in zip(STUDIES, ["demo", "banking77_sample"]):
        study = _study(tmp_path, name)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
        assert sorted(t.user_attrs["max_steps"] for t in study.trials) == [8, 12]
        # the params a single-dataset sweep records: the dataset picks the study, it is not a param
        assert all(set(t.params) == {"schedule.max_steps"} for t in study.trials)
        assert {t.user_attrs["choices"]["data"] for t in study.trials} == {data}
        assert study.user_attrs["data"] == data
        assert all(t.user_attrs["run_dir"].startswith(str(tmp_path / "sweeps" / name)) for t in study.trials)
        assert (tmp_path / "sweeps" / name / "summary.md").is_file()
        assert f"study '{name}' in" in log and "2 to run, 0 already done" in log
    assert "2 studies, one per dataset and model (demo-tiny, banking77_sample-tiny): 4 trial(s) to run" in log
    # trials in the command's order, across the studies: 8-demo, 8-banking, 12-demo, 12-banking
    starts = sorted((t.datetime_start, t.user_attrs["max_steps"], n) for n in STUDIES for t in _study(tmp_path, n).trials)
    assert [(s, n) for _, s, n in starts] == [(8, STUDIES[0]), (8, STUDIES[1]), (12, STUDIES[0]), (12, STUDIES[1])]

    # one table, a row per dataset, each what its own study's report recommends
    rows = _table_rows(out.stdout)
    assert list(rows) == ["demo", "banking77_sample"]
    for name, data in zip(STUDIES, rows):
        study, cells = _study(tmp_path, name), rows[data]
        rec, row = recommend(study, _storage(tmp_path)), dataset_row(study, _storage(tmp_path))
        assert f"**Recommended for {data}: max_steps={rec['max_steps']}.**" in study_report(study)
        assert cells[4] == str(rec["max_steps"]) and cells[8] == f"{rec['value']:.4f}"
        best = study.best_trial
        assert row["rows"] == best.user_attrs["train_rows"] and cells[2] == f"{row['rows']:,}"
        plan = best.system_attrs["plan"]
        assert row["epochs"] == pytest.approx(rec["max_steps"] / plan["steps_per_epoch"])
        assert row["tokens_per_row"] > 0 and row["cost_s"] > 0 and cells[12].endswith("CPU s")
        assert cells[10] == f"±{rec['noise'].sigma:.4f}" and cells[13] == rec["verdict"]
    # the next grid it proposes runs on the same dataset with the same settings (not on the default data)
    proposal = rows["banking77_sample"][13]
    assert "python train.py -m schedule.max_steps=" in proposal and "data=banking77_sample" in proposal
    assert "data.demo_rows=120" in proposal and "paths." not in proposal
    # ... in the same study and storage (named: the sweep's storage is not the default), no other sweeper setting
    assert [w for w in proposal.rstrip("`").split() if w.startswith("hydra.")] == [
        "hydra.sweeper.study_name=banking77_sample-tiny", f"hydra.sweeper.storage={_storage(tmp_path)}"]
    assert (tmp_path / "sweeps" / "summary.md").read_text().strip() in out.stdout
    assert (tmp_path / "sweeps" / "datasets.png").stat().st_size > 10_000

    # `python -m sweeper report` over the storage: the same table first, then each study's report
    from sweeper.__main__ import main

    assert main(["report", "--storage", _storage(tmp_path), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "summary.md").read_text()
    assert md.index("## Step count per dataset") < md.index("## demo-tiny")
    assert _table_rows(md) == {**rows}
    assert datasets_table([_study(tmp_path, n) for n in STUDIES], _storage(tmp_path)) in md
    assert "Step count per dataset" in (tmp_path / "report" / "report.html").read_text()

    # re-running resumes both studies: nothing to run
    again = _ok(run_in_process("-m", "schedule.max_steps=8,12", "data=demo,banking77_sample", *base))
    assert (again.stdout + again.stderr).count("0 to run, 2 already done") == 2
    assert all(len(_study(tmp_path, n).trials) == 2 for n in STUDIES)
    # other settings are refused; the way to new studies is another storage (one study_name cannot name two)
    stale = run_in_process("-m", "schedule.max_steps=8,12", "data=demo,banking77_sample", "lr.learning_rate=3e-4", *base)
    assert stale.returncode != 0 and "ran other settings than this command" in stale.stderr
    assert "start new studies in another file with hydra.sweeper.storage=sqlite:///<new file>.db" in stale.stderr
    assert "hydra.sweeper.study_name=<new name>" not in stale.stderr
    assert all(len(_study(tmp_path, n).trials) == 2 for n in STUDIES)  # nothing half-written
    # a single-dataset command resumes its study too (named as it would name it)
    one = _ok(run_in_process("-m", "schedule.max_steps=8,12", "data=banking77_sample", *base))
    assert "0 to run, 2 already done" in one.stdout + one.stderr and _names(tmp_path) == sorted(STUDIES)

    # a third dataset in the list: only its trials run
    more = _ok(run_in_process("-m", "schedule.max_steps=8,12", "data=demo,banking77_sample,snips_sample", *base))
    assert _names(tmp_path) == sorted([*STUDIES, "snips_sample-tiny"])
    assert all(len(_study(tmp_path, n).trials) == 2 for n in STUDIES)
    assert [t.state for t in _study(tmp_path, "snips_sample-tiny").trials] == [TrialState.COMPLETE] * 2
    assert list(_table_rows(more.stdout)) == ["demo", "banking77_sample", "snips_sample"]


@pytest.mark.slow
def test_wsd_search_over_two_datasets_records_branches_in_each_study(tmp_path, cache_dir):
    base = [*fast("schedule.max_steps"), f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    out = _ok(run_in_process("-m", "schedule=wsd_search", "schedule.wsd.candidates=[8,12]",
                      "data=banking77_sample,snips_sample", *base))
    for name in ("banking77_sample-tiny", "snips_sample-tiny"):
        trials = _study(tmp_path, name).trials
        assert {t.params.get("method") for t in trials} == {"wsd"}
        assert sorted(t.user_attrs["max_steps"] for t in trials) == [8, 12]  # the trunk and its branch
        assert any("wsd_branch_of" in t.system_attrs for t in trials)
    assert list(_table_rows(out.stdout)) == ["banking77_sample", "snips_sample"]
    assert sorted(p.name for p in (tmp_path / "sweeps").iterdir() if p.is_dir()) == [
        "banking77_sample-tiny", "snips_sample-tiny"]  # no empty folder of the default data's study


@pytest.mark.parametrize("args,needle", [
    (["data=demo,banking77_sample", "hydra.sweeper.study_name=mine"],
     "hydra.sweeper.study_name='mine' names one study, but this sweep covers 2 datasets/models "
     "(demo-tiny, banking77_sample-tiny)"),
    (["data=choice(demo,banking77_sample)", "hydra.sweeper.n_trials=2"],
     "data=choice(demo,banking77_sample) samples the dataset or model, but each has its own study"),
    (["data=demo,banking77_sample", "hydra.sweep.dir=/tmp/one_folder"],
     "hydra.sweep.dir=/tmp/one_folder is one folder for the studies 'demo-tiny' and 'banking77_sample-tiny'"),
])
def test_a_study_holds_one_dataset_and_model(tmp_path, cache_dir, args, needle):
    proc = run_in_process("-m", "schedule.max_steps=8", *args, *fast("schedule.max_steps"),
                          f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}")
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    db = tmp_path / "optuna.db"
    if db.exists():
        assert all(not s.n_trials for s in optuna.get_all_study_summaries(_storage(tmp_path)))


def test_plan_prints_one_block_per_dataset(tmp_path, cache_dir):
    from sweeper.plan_command import plan_rows, render

    rows = plan_rows(["schedule.max_steps=8,12", "data=demo,banking77_sample", *fast("schedule.max_steps"),
                      f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
    text = render(rows)
    heads = re.findall(r"^## study (\S+): data (\S+), model tiny, (\d) run\(s\)$", text, flags=re.M)
    assert heads == [("demo-tiny", "demo", "2"), ("banking77_sample-tiny", "banking77_sample", "2")]
    demo, banking = text.split("## study banking77_sample-tiny")
    assert "data=demo" in demo and "data=banking77_sample" not in demo
    assert "data=banking77_sample" in banking and "data=demo " not in banking
