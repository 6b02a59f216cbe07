"""Bad input: one clear line naming the key, file or option, no traceback, nothing written to a study.

A table of sweep commands (`python train.py -m ...`) and their expected messages, each run through Hydra's
entry in this process (``tests.helpers.run_in_process``: the same parsing, composition, sweeper and error
report as the command, without an interpreter start each); one case of each kind of error (composition,
a config rule, a sweeper setting, the data, the storage) also runs as a real subprocess (slow tier), as do
the `python -m sweeper ...` commands."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from .conftest import FAST, PG_URL, ROOT, mount_tmpfs, postgres_unreachable, run_cli, skip_or_fail, unmount
from .helpers import fast, run_in_process, sweeper_in_process


def _non_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
    path.write_bytes(good.encode() * 2 + '{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'.encode("latin-1"))
    return ["data=jsonl", f"data.train_path={path}"]


def _jsonl(tmp_path, name, rows) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _chat(user, assistant=None):
    turns = [{"role": "user", "content": user}]
    return {"messages": turns + ([{"role": "assistant", "content": assistant}] if assistant is not None else [])}


GOOD = [_chat(f"question {i}", f"answer {i}") for i in range(40)]


def _train_and_eval(eval_rows, **more):
    """Train on GOOD (``data.train_path=None`` in ``more``: on ``eval_rows`` too), evaluate on ``eval_rows``."""
    def make(tmp_path):
        train = GOOD if more.get("data.train_path", "") is not None else eval_rows
        return ["data=jsonl", f"data.train_path={_jsonl(tmp_path, 'train.jsonl', train)}",
                f"data.eval_path={_jsonl(tmp_path, 'eval.jsonl', eval_rows)}",
                *[f"{k}={v}" for k, v in more.items() if k != "data.train_path"]]
    return make


def _train_only(rows, text=None):
    def make(tmp_path):
        path = tmp_path / "train.jsonl"
        if text is not None:
            path.write_text(text)
        else:
            _jsonl(tmp_path, "train.jsonl", rows)
        return ["data=jsonl", f"data.train_path={path}"]
    return make


def _file(name, text):
    """data.train_path at a file ``name`` holding ``text`` (None: a Parquet table of prompt/completion, 0 rows)."""
    def make(tmp_path):
        path = tmp_path / name
        if text is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({c: pa.array([], pa.string()) for c in ("prompt", "completion")}), path)
        else:
            path.write_text(text)
        return ["data=jsonl", f"data.train_path={path}"]
    return make


def _readonly(tmp_path):
    """A read-only file system: root ignores file modes, so only a read-only mount says no."""
    return mount_tmpfs(tmp_path / "ro", "size=1m,ro")


def _study_file(path):
    """A real SQLite study file (one finished trial) at ``path``."""
    import optuna

    path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name="s")
    for i in range(30):  # some pages beyond the schema's
        study.add_trial(optuna.trial.create_trial(value=1.0 + i, intermediate_values={1: 1.0 + i},
                                                  user_attrs={"max_steps": 1, "note": "x" * 500}))
    return path


def _cut_short(tmp_path):
    """A study file cut to half its size (a copy interrupted, a full disk)."""
    path = _study_file(tmp_path / "damaged" / "optuna.db")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _overwritten(tmp_path):
    """A study file whose pages after SQLite's header were overwritten with other bytes."""
    path = _study_file(tmp_path / "damaged" / "optuna.db")
    data = bytearray(path.read_bytes())
    data[100:] = bytes((i * 7 + 3) % 256 for i in range(len(data) - 100))
    path.write_bytes(bytes(data))
    return path


def _postgres(role: str, database: str = "test", limit: int | None = None):
    """A PostgreSQL URL on the tests' server for ``role`` (with ``limit``: a role of that CONNECTION LIMIT
    owning a database of its name, so that it could create a study there); its password must be masked in
    every message. Skips when the server is down."""
    def make(tmp_path):
        reason = postgres_unreachable()
        if reason:
            skip_or_fail(reason)
        if limit is not None:
            _limited_role(role, limit)
        return f"postgresql://{role}:pa55w0rd@127.0.0.1:5432/{role if limit is not None else database}"
    return make


def _limited_role(role: str, limit: int) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        if not c.execute(sqlalchemy.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first():
            c.execute(sqlalchemy.text(f"CREATE ROLE {role} LOGIN"))
        if not c.execute(sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :r"), {"r": role}).first():
            c.execute(sqlalchemy.text(f"CREATE DATABASE {role} OWNER {role}"))
        c.execute(sqlalchemy.text(f"ALTER ROLE {role} CONNECTION LIMIT {limit}"))
    engine.dispose()


def _studies_in(database: str) -> list[str]:
    """Study names in a database of the tests' server, read as its superuser (no schema: none)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(PG_URL.rsplit("/", 1)[0] + f"/{database}")
    with engine.connect() as c:
        if not c.execute(sqlalchemy.text("SELECT to_regclass('public.studies')")).scalar():
            return []
        names = [r[0] for r in c.execute(sqlalchemy.text("SELECT study_name FROM studies"))]
    engine.dispose()
    return names


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LIMITED_ROLE = "sft_sweep_limited"  # CONNECTION LIMIT 2: a sweep's worker holds up to 4


def _storage(url_of):
    return lambda p: [f"hydra.sweeper.storage={url_of(p) if callable(url_of) else url_of}"]


def _sqlite(path_of):
    return lambda p: [f"hydra.sweeper.storage=sqlite:///{path_of(p)}"]


LONG = _chat("x " * 3000, "y")  # its answer starts past any small data.max_length


def _model_folder(*files):
    """``model.path`` at a folder holding ``files`` (each with ``{}`` in it): part of a saved model, or none."""
    def make(tmp_path):
        folder = tmp_path / "mymodel"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")
        return [f"model.path={folder}"]
    return make

CASES = [
    # (id, overrides or a function of tmp_path giving them, the line expected on stderr)
    ("reversed interval", ["lr.learning_rate=interval(3e-4,1e-5)"],
     "lr.learning_rate=interval(0.0003,1e-05): the low end must not exceed the high end"),
    ("log interval from 0", ["lr.learning_rate=tag(log,interval(0,1e-3))"], "needs a low end above 0"),
    ("log range from 0", ["schedule.max_steps=tag(log,range(0,20))"],
     "schedule.max_steps: tag(log, range(0,20,1)) needs a start of at least 1"),
    ("unknown tag", ["lr.learning_rate=tag(lg,interval(1e-5,1e-3))"],
     "lr.learning_rate=tag(lg,interval(1e-5,1e-3)): unknown tag 'lg'; the tags are log (log scale), int (whole "
     "numbers), float (floats)"),
    ("tag on a choice", ["lr.learning_rate=tag(log,choice(1e-5,1e-4,1e-3))"],
     "lr.learning_rate=tag(log,choice(1e-5,1e-4,1e-3)): tag(log, ...) has no meaning for a choice"),
    # a sampled key's search space checked at its ends by the rules of a fixed value
    ("interval below what its key takes", ["lr.learning_rate=interval(-1,1)"],
     "lr.learning_rate=interval(-1.0,1.0) samples -1.0 (its low end), refused as lr.learning_rate=-1.0 would be: "
     "lr.learning_rate must be positive, but got -1.0"),
    ("interval above what its key takes", ["data.eval_fraction=interval(0.5,1.5)"],
     "data.eval_fraction=interval(0.5,1.5) samples 1.5 (its high end), refused as data.eval_fraction=1.5 would be: "
     "data.eval_fraction must be between 0 and 1 (exclusive)"),
    ("interval leaving no train rows at its end", ["data.eval_fraction=interval(0.5,0.999)"],
     "data.eval_fraction=interval(0.5,0.999) samples 0.999 (its high end), refused as data.eval_fraction=0.999 would "
     "be: data.eval_fraction=0.999 of 120 rows"),
    ("int interval reaching 0", ["schedule.max_steps=int(interval(0,20))"],
     "schedule.max_steps=int(interval(0,20)) samples 0 (its low end)"),
    ("choice holding a refused value", ["lr.warmup_steps=choice(0.1,-1,0.2)", "hydra.sweeper.n_trials=2"],
     "lr.warmup_steps=choice(0.1,-1,0.2) samples -1 (a choice), refused as lr.warmup_steps=-1 would be: "
     "lr.warmup_steps must be >= 0"),
    ("range past what its key takes", ["data.eval_fraction=range(0.5,1.5,0.25)", "hydra.sweeper.n_trials=2"],
     "data.eval_fraction=range(0.5,1.5,0.25) samples 1.25 (its high end)"),
    ("non-UTF-8 data", _non_utf8, "line 3 is not UTF-8 text (byte 0xe9"),
    ("mysql without its driver", ["hydra.sweeper.storage=mysql://root@127.0.0.1:3306/test"],
     "hydra.sweeper.storage=mysql://root@127.0.0.1:3306/test needs a database driver that is not installed"),
    ("misspelt key added with +", ["+eval.eval_step=5"], "did you mean eval.eval_steps?"),
    ("fp16 on a CPU machine", ["precision=fp16"], "needs a CUDA GPU, and none is visible"),
    ("GPU-only speed choice on a CPU machine", ["speed.graphs=true"], "speed.graphs=true needs a CUDA GPU"),
    ("varlen attention on a CPU machine", ["speed.attention=varlen"], "speed.attention=varlen needs a CUDA GPU"),
    ("workers zero", ["hydra.sweeper.workers=0"], "hydra.sweeper.workers must be auto or a whole number >= 1"),
    ("workers not a number", ["hydra.sweeper.workers=zero"], "but got 'zero'"),
    ("several GPUs for one worker", ["hydra.sweeper.gpus=['0,1']"],
     "one trial runs on one GPU (for now), so each entry is one GPU id"),
    ("unknown launcher", ["hydra.sweeper.launcher=k8s"], "hydra.sweeper.launcher must be one of local, slurm, but got 'k8s'"),
    ("SLURM on SQLite", ["hydra.sweeper.launcher=slurm"], "SQLite"),
    ("SLURM with two GPUs a trial", ["hydra.sweeper.launcher=slurm", "hydra.sweeper.storage=postgresql://x@h/db",
                                     "hydra.sweeper.slurm.gpus_per_worker=2"], "one trial runs on one GPU (for now)"),
    ("hub model without its name", ["model=hub", "model.path=Qwen/Qwen2.5-0.5B-Instruct"], "model.name must be set"),
    ("study name with a slash", ["hydra.sweeper.study_name=runs/a"],
     "hydra.sweeper.study_name='runs/a' cannot name a study and its folder: it holds '/'"),
    ("study name '..'", ["hydra.sweeper.study_name=.."], "it is a relative folder name"),
    ("hub-style model name", ["model.name=org/tiny"], "data.name='demo' and model.name='org/tiny' make the study name "
     "'demo-org/tiny' (<data.name>-<model.name>), which cannot name a study and its folder: it holds '/'"),
    ("data name leaving the folder", ["data.name='../x'"], "make the study name '../x-tiny'"),
    # data
    ("eval rows all cut by max_length", _train_and_eval([LONG] * 3, **{"data.max_length": 64}),
     "0 of 3 eval rows keep a token to score after truncation at data.max_length=64"),
    ("train rows all cut by max_length", lambda p: ["data=jsonl", f"data.train_path={_jsonl(p, 't.jsonl', [LONG] * 20)}",
                                                    f"data.eval_path={_jsonl(p, 'e.jsonl', GOOD)}", "data.max_length=64"],
     "0 of 20 train rows keep a token to learn from after truncation at data.max_length=64 (the assistant turn starts "
     "beyond it); raise it to at least data.max_length=6014 (the shortest prompt is 6013 tokens; data.max_length=6014 "
     "keeps every row), or shorten the prompts"),
    ("demo rows all cut by max_length", ["data.max_length=8"], "0 of 108 train rows keep a token to learn from after "
     "truncation at data.max_length=8 (the assistant turn starts beyond it); raise it to at least data.max_length=18 "
     "(the shortest prompt is 17 tokens; data.max_length=36 keeps every row)"),
    ("empty train file", _train_only([], text=""), "train.jsonl has no rows (an empty file); it needs at least one row"),
    ("empty JSON list", _file("train.json", "[]\n"), "train.json has no rows (an empty JSON list); it needs at least one"),
    ("CSV of a header alone", _file("train.csv", "prompt,completion\n"),
     "train.csv has no rows (only its header line, prompt,completion); it needs at least one row"),
    ("Parquet of 0 rows", _file("train.parquet", None), "train.parquet has no rows (a Parquet table of 0 rows)"),
    ("empty eval file", _train_and_eval([]), "eval.jsonl has no rows (an empty file)"),
    ("invalid JSON line", _train_only([], text=json.dumps(GOOD[0]) + "\n{not json\n"), "line 2 is not valid JSON"),
    ("rows in no known format", _train_only([{"body": "hello"}] * 5), "need a 'messages' column"),
    ("train file missing", lambda p: ["data=jsonl", f"data.train_path={p / 'nope.jsonl'}"], "file not found"),
    ("row 31 without an assistant turn", _train_only(GOOD[:30] + [_chat("only a question")] + GOOD[30:]),
     "line 31: no assistant message to learn from"),
    ("eval_accuracy on answers that are no label set", lambda p: [*_train_only(GOOD)(p), "data.name=train", "eval.metric=eval_accuracy"],
     "eval.metric=eval_accuracy, but the answers of train are not a label set (38 distinct answers in 38 train rows"),
    ("eval in another format than train", _train_and_eval([{"prompt": "p", "completion": "c"}] * 3),
     "is in prompt_completion format but data.train_path is in messages; use one format"),
    ("rows all cut, with a bitsandbytes optimizer", lambda p: ["data.max_length=8", "lr.optim=adamw_bnb_8bit"],
     "0 of 108 train rows keep a token to learn from after truncation at data.max_length=8"),
    ("eval fraction leaving no train rows", ["data.eval_fraction=0.999"], "both need at least one"),
    ("fewer train rows than a step", _train_and_eval(GOOD[:3], **{"data.train_path": None}),
     "3 train row(s), fewer than the effective batch of 4 rows per optimizer step (batch=auto without a GPU trains its "
     "preset batch.per_device_train_batch_size=4 x batch.gradient_accumulation_steps=1), so every step would repeat "
     "rows; add rows, or set batch.auto.target_effective_batch=3 batch.per_device_train_batch_size=3 "
     "batch.gradient_accumulation_steps=1"),
    ("max_train_rows zero", ["data.max_train_rows=0"], "data.max_train_rows must be >= 1 or null"),
    ("max_length below 8", ["data.max_length=0"], "data.max_length must be >= 8 tokens"),
    ("unknown loss_on", ["data.loss_on=everything"], "data.loss_on must be one of ['completion', 'all']"),
    # the model
    ("model folder missing", lambda p: [f"model.path={p / 'nope'}"], "/nope': no such folder"),
    ("model path a file", lambda p: [f"model.path={_jsonl(p, 't.jsonl', GOOD)}"], "t.jsonl is a file, not a model folder"),
    ("model folder without a model", _model_folder("tokenizer.json"), "/mymodel holds no config.json, so no saved model"),
    ("model folder without weights", _model_folder("config.json", "tokenizer.json"),
     "/mymodel holds a config.json but no weights"),
    # folders
    ("read-only output folder", lambda p: [f"paths.output_dir={_readonly(p)}"],
     "/ro cannot be written (Read-only file system); point paths.output_dir at a folder this user can write"),
    ("read-only cache folder", lambda p: [f"paths.cache_dir={_readonly(p) / 'cache'}"],
     "paths.cache_dir="),
    ("read-only database folder", lambda p: [f"hydra.sweeper.storage=sqlite:///{_readonly(p)}/optuna.db"],
     "/ro cannot be written (Read-only file system); point hydra.sweeper.storage at"),
    # run settings
    ("max_steps zero", ["schedule.max_steps=0"], "schedule.max_steps must be positive, but got 0"),
    ("max_steps not a number", ["schedule.max_steps=abc"], "Error merging override schedule.max_steps=abc; Value 'abc' "
     "of type 'str' could not be converted to Integer"),
    ("unknown key", ["schedul.max_steps=3"], "Could not override 'schedul.max_steps': schedul is not a key of the "
     "config; did you mean schedule.max_steps=3?"),
    ("unknown key with a value list", ["schedule.max_step=4,6"], "Could not override 'schedule.max_step': "
     "schedule.max_step is not a key of the config; did you mean schedule.max_steps=4,6? (known in schedule: "),
    ("wsd search with two objectives", ["schedule=wsd_search", "schedule.wsd.candidates=[4,8]", "schedule.max_steps=null",
                                        "hydra.sweeper.direction=[minimize,minimize]", "hydra.sweeper.cost=steps"],
     "so it cannot run with two objectives (hydra.sweeper.direction=[minimize,minimize])"),
    ("unknown key with a sampled space", ["schedule.max_step=interval(4,6)", "hydra.sweeper.n_trials=2"],
     "did you mean schedule.max_steps=interval(4,6)?"),
    ("unknown schedule", ["schedule=nonexistent"], "Could not find 'schedule/nonexistent'; Available options in "
     "'schedule': epochs3, over, sweet, under, wsd_search"),
    ("required file not given", ["data=jsonl"], "data.train_path must be set, but is ??? (a required value of the "
     "option chosen); add data.train_path=... to the command"),
    ("negative learning rate", ["lr.learning_rate=-1"], "lr.learning_rate must be positive"),
    ("unknown scheduler", ["lr.lr_scheduler_type=cosin"], "lr.lr_scheduler_type must be one of transformers' "
     "SchedulerType (linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt"),
    ("unknown optimizer", ["lr.optim=adam"], "lr.optim must be one of transformers' OptimizerNames (adamw_torch, "),
    ("negative warmup", ["lr.warmup_steps=-1"], "lr.warmup_steps must be >= 0"),
    ("warmup longer than the run", ["lr.warmup_steps=50"], "must be shorter than schedule.max_steps (12)"),
    ("micro-batch zero", ["batch.per_device_train_batch_size=0"], "batch.per_device_train_batch_size must be >= 1"),
    ("unknown metric", ["eval.metric=eval_foo"], "eval.metric must be one of ['eval_accuracy', 'eval_loss', 'eval_mean_token_accuracy']"),
    ("eval_steps zero", ["eval.eval_steps=0"], "eval.eval_steps must be >= 1"),
    ("unknown accuracy mode", ["eval.accuracy=maybe"], "eval.accuracy must be one of ['auto', 'on', 'off']"),
    ("logging_steps zero", ["eval.logging_steps=0"], "eval.logging_steps must be >= 1"),
    ("negative weight decay", ["lr.weight_decay=-1"], "lr.weight_decay must be >= 0 (0: none), but got -1.0"),
    ("negative max_grad_norm", ["lr.max_grad_norm=-1"], "lr.max_grad_norm must be >= 0 (0: no clipping)"),
    ("LoRA rank zero", ["peft=lora", "peft.r=0"], "peft.r (the LoRA rank) must be >= 1, but got 0"),
    ("LoRA dropout above 1", ["peft=lora", "peft.lora_dropout=1.5"], "peft.lora_dropout must be in [0, 1), but got 1.5"),
    ("LoRA alpha zero", ["peft=lora", "peft.lora_alpha=0"], "peft.lora_alpha must be positive, but got 0"),
    ("negative early stopping threshold", ["eval.early_stopping_threshold=-1"],
     "eval.early_stopping_threshold must be >= 0 (the least improvement of eval.metric that resets the patience), "
     "but got -1.0"),
    ("empty data name", ["data.name=''"], "data.name must not be empty: it names the study"),
    ("blank model name", ["model.name=' '"], "model.name must not be empty"),
    ("GPU ids that are not visible", ["hydra.sweeper.gpus=[0,99]"], "hydra.sweeper.gpus=[0,99]"),  # none here, or 99
    ("patience zero", ["eval.early_stopping_patience=0"], "eval.early_stopping_patience must be >= 1 or null"),
    ("4-bit weights without adapters", ["precision=qlora4", "peft=none"], "add peft=lora"),
    # sweeper settings
    ("search_space, hydra-optuna-sweeper's old form", ["hydra.sweeper.search_space={a:1}"],
     "hydra.sweeper.search_space (a: ...) is hydra-optuna-sweeper's deprecated form; give the space as "
     "hydra.sweeper.params"),
    ("params with a grammar error", ["hydra.sweeper.params={lr.learning_rate:'interval(1e-3'}"],
     "hydra.sweeper.params.lr.learning_rate: Error parsing override 'lr.learning_rate=interval(1e-3': no viable "
     "alternative at input 'interval(1e-3'"),
    ("params not a mapping", ["hydra.sweeper.params=5"], "hydra.sweeper.params must be a mapping of keys to overrides"),
    ("params value not an override", ["hydra.sweeper.params={seed:[1,2]}"],
     "hydra.sweeper.params.seed must be one override in the sweep grammar"),
    ("two grid points composing one run", ["schedule=under,sweet", "schedule.max_steps=10"],
     "schedule=under and schedule=sweet compose the same run (schedule.max_steps=10 sets what tells them apart): the "
     "sweep would train it once for each; sweep only one of them, or drop schedule.max_steps=10"),
    ("two sampled choices composing one run", ["schedule=choice(under,sweet)", "schedule.max_steps=10",
                                               "hydra.sweeper.n_trials=1"],
     "schedule=under and schedule=sweet compose the same run"),
    ("n_trials zero", ["hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials must be >= 1 or null, but got 0"),
    ("max_failures zero", ["hydra.sweeper.max_failures=0"], "hydra.sweeper.max_failures must be >= 1 or null"),
    ("negative heartbeat", ["hydra.sweeper.heartbeat_interval=-1"], "hydra.sweeper.heartbeat_interval must be >= 1"),
    ("negative max_retry", ["hydra.sweeper.max_retry=-1"], "hydra.sweeper.max_retry must be >= 0 or null"),
    ("unknown sampler", ["hydra.sweeper.sampler.name=nope"], "hydra.sweeper.sampler.name must be one of tpe, random, grid"),
    ("unknown pruner", ["hydra.sweeper.pruner.name=nope"], "hydra.sweeper.pruner.name must be one of none, median"),
    ("storage URL of no known database", ["hydra.sweeper.storage=foo://x"], "hydra.sweeper.storage=foo://x could not be opened"),
    # the study storage itself
    ("SQLite study file cut short", _sqlite(_cut_short),
     "/damaged/optuna.db is not a readable Optuna SQLite database (SQLite says: database disk image is malformed"),
    ("SQLite study file overwritten", _sqlite(_overwritten), "/damaged/optuna.db is not a readable Optuna SQLite database"),
    ("PostgreSQL role at its connection limit", _storage(_postgres(LIMITED_ROLE, limit=2)),
     f"hydra.sweeper.storage=postgresql://{LIMITED_ROLE}:***@127.0.0.1:5432/{LIMITED_ROLE}: role '{LIMITED_ROLE}' "
     "allows 2 connection(s) (CONNECTION LIMIT 2)"),
    ("PostgreSQL server down", lambda p: [f"hydra.sweeper.storage=postgresql://postgres:pa55w0rd@127.0.0.1:"
                                          f"{_closed_port()}/test"], "no PostgreSQL server answers at 127.0.0.1:"),
    ("PostgreSQL database missing", _storage(_postgres("postgres", "no_such_db")),
     "the server at 127.0.0.1:5432 has no database 'no_such_db'; create it"),
    ("PostgreSQL password with an unencoded @ and :",
     ["hydra.sweeper.storage=postgresql://postgres:pa55w0rd@x:y@127.0.0.1:5432/test"],
     "hydra.sweeper.storage=postgresql://postgres:***@127.0.0.1:5432/test: its user or password holds an @ that is "
     "not percent-encoded; write a password's special characters percent-encoded (@ as %40, : as %3A"),
    ("PostgreSQL password as a query parameter",
     lambda p: [f"hydra.sweeper.storage='{_postgres('postgres', 'no_such_db')(p).replace(':pa55w0rd', '')}"
                "?sslmode=disable&password=pa55w0rd'"],
     "hydra.sweeper.storage=postgresql://postgres@127.0.0.1:5432/no_such_db?sslmode=disable&password=***: the "
     "server at 127.0.0.1:5432 has no database 'no_such_db'"),
    ("PostgreSQL role missing", _storage(_postgres("no_such_role")),
     "the server at 127.0.0.1:5432 has no role 'no_such_role'; create it"),
    ("floats sampled for an int key", ["schedule.max_steps=interval(10,20)"],
     "schedule.max_steps takes whole numbers (int), but interval(10.0,20.0) samples floats"),
    ("descending range", ["schedule.max_steps=range(20,10,-5)"], "a descending range is not a search space"),
    ("direction against the metric", ["hydra.sweeper.direction=maximize"],
     "hydra.sweeper.direction=maximize, but the objective is eval.metric=eval_loss"),
    ("sampler option its class lacks", ["+hydra.sweeper.sampler.n_startup=3"], "TPESampler takes no option 'n_startup'"),
]


# one case per kind of error, run as the real command too: composition (Hydra), a config rule, a sweeper
# setting, the data pre-flight, the storage
SUBPROCESS = [c for c in CASES if c[0] in {"unknown schedule", "max_steps zero", "workers zero", "non-UTF-8 data",
                                           "storage URL of no known database",
                                           "rows all cut, with a bitsandbytes optimizer"}]


# the same input refused by a single run (no -m) in the same one line
SINGLE_RUN = [c for c in CASES if c[0] in {
    "GPU-only speed choice on a CPU machine", "unknown scheduler", "unknown optimizer", "model folder missing", "model path a file",
    "model folder without a model", "model folder without weights", "train rows all cut by max_length",
    "eval rows all cut by max_length", "empty train file", "empty JSON list", "CSV of a header alone", "max_steps zero",
    "required file not given", "fewer train rows than a step", "demo rows all cut by max_length",
    "read-only output folder", "read-only cache folder"}]


def _refused(tmp_path, cache_dir, case, run, sweep=True):
    _, overrides, needle = case
    try:
        args = overrides(tmp_path) if callable(overrides) else overrides
        proc = run(*(["-m", "seed=1,2"] if sweep else []), *FAST, f"paths.output_dir={tmp_path}",
                   f"paths.cache_dir={cache_dir}", *args)
    finally:
        unmount(tmp_path / "ro")
    assert proc.returncode != 0
    assert needle in proc.stderr and proc.stderr.count(needle) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "pa55w0rd" not in proc.stdout + proc.stderr
    assert "kernels-community" not in proc.stdout + proc.stderr  # bitsandbytes, as it loads (first import)
    assert not (tmp_path / "optuna.db").exists()  # no study, no trial
    if run is run_cli:  # the command's own process: no line after the refusal (Hydra's HYDRA_FULL_ERROR hint)
        assert "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_sweep_input_is_one_clear_line(tmp_path, cache_dir, case):
    _refused(tmp_path, cache_dir, case, run_in_process)


@pytest.mark.parametrize("case", SINGLE_RUN, ids=[c[0] for c in SINGLE_RUN])
def test_bad_single_run_input_is_the_same_one_line(tmp_path, cache_dir, case):
    proc = _refused(tmp_path, cache_dir, case, run_in_process, sweep=False)
    # the refusal, but for log lines and Hydra's lines around it, which the command leaves out (sweeper.cli)
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith(("[20", "Error executing job"))
             and "HYDRA_FULL_ERROR" not in x]
    assert len(lines) == 1 and case[2] in lines[0], proc.stderr[-3000:]


@pytest.mark.parametrize("name,marker", [("fewer train rows than a step", "or set "),
                                         ("demo rows all cut by max_length", "raise it to at least ")],
                         ids=["too few train rows", "rows all cut by max_length"])
def test_the_advice_of_a_refusal_runs(tmp_path, cache_dir, name, marker):
    """The overrides the refusal names make the same command run (batch=auto on this GPU-less machine too)."""
    [case] = [c for c in CASES if c[0] == name]
    overrides = case[1](tmp_path) if callable(case[1]) else case[1]
    args = [*FAST, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}", *overrides,
            "schedule.max_steps=2", "eval.eval_steps=2"]
    refused = run_in_process(*args)
    assert refused.returncode == 1 and case[2] in refused.stderr, refused.stderr[-2000:]
    words = refused.stderr.split(marker, 1)[1].split()
    advice = [w for w in words[:next((i for i, w in enumerate(words) if "=" not in w), len(words))]]
    assert advice
    proc = run_in_process(*args, *advice)
    assert proc.returncode == 0, proc.stderr[-2000:]


# the same input refused by `python -m sweeper plan` in the same words
PLAN = [c for c in CASES if c[0] in {
    "unknown scheduler", "unknown optimizer", "model folder missing", "model path a file", "model folder without a model",
    "model folder without weights", "train rows all cut by max_length", "eval rows all cut by max_length",
    "empty train file", "empty JSON list", "CSV of a header alone", "Parquet of 0 rows", "max_steps zero",
    "unknown schedule", "required file not given", "max_steps not a number", "unknown key", "fewer train rows than a step",
    "demo rows all cut by max_length"}]


@pytest.mark.parametrize("case", PLAN, ids=[c[0] for c in PLAN])
def test_bad_input_to_plan_is_the_sweeps_one_line(tmp_path, cache_dir, case):
    _, overrides, needle = case
    args = overrides(tmp_path) if callable(overrides) else overrides
    proc = sweeper_in_process("plan", *FAST, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}", *args)
    # stderr: a progress line per dataset prepared, then the refusal
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: ") and needle in last, proc.stderr[-3000:]
    assert proc.stderr.count(needle) == 1 and "***" not in proc.stderr  # said once; nothing masked that is no secret
    assert "Traceback" not in proc.stderr and not (tmp_path / "optuna.db").exists()


@pytest.mark.parametrize("seed", [-1, 99999999999])
def test_a_sweeps_seed_out_of_range_is_the_single_runs_line(compose_cfg, seed):
    """The sweep's sampler takes ``${seed}``: the sweep refuses the seed with the single run's line, naming
    ``seed``, before the sampler refuses it in its own words."""
    from omegaconf import OmegaConf

    from sweeper.config import validate
    from sweeper.sweep.settings import parse

    cfg = compose_cfg(f"seed={seed}")
    with pytest.raises(ValueError) as single:
        validate(cfg)
    with pytest.raises(ValueError) as sweep:
        parse(OmegaConf.to_container(cfg.hydra.sweeper, resolve=True), cfg, "test")
    assert str(sweep.value) == str(single.value) == (
        f"seed must be between 0 and 4294967295 (numpy's seed range), but got {seed}; e.g. seed=42")


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS, ids=[c[0] for c in SUBPROCESS])
def test_bad_sweep_input_is_one_clear_line_from_the_command(tmp_path, cache_dir, case):
    _refused(tmp_path, cache_dir, case, run_cli)


def _with_a_users_file(tmp_path, monkeypatch, capsys, rel: str, text: str, command: list) -> str:
    """What ``command`` (a sweep, a single run or ``plan``) prints on stderr, refused, with ``--config-dir conf``
    holding ``conf/<rel>`` of ``text``."""
    from sweeper import cli

    (tmp_path / "conf" / rel).parent.mkdir(parents=True)
    (tmp_path / "conf" / rel).write_text(text)
    monkeypatch.chdir(tmp_path)
    argv = command[:1] + ["--config-dir", "conf"] + command[1:] if command[0] == "plan" else ["--config-dir", "conf",
                                                                                              *command]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")


@pytest.mark.parametrize("text,said", [
    ("name: mydata\ntrain_path: [oops\n", "mydata.yaml is not valid YAML at line 3, column 1: expected ',' or ']', "
     "but got '<stream end>' (while parsing a flow sequence that starts at line 2, column 13)"),
    ("name: mydata\nmax_length: 64: 128\n", "mydata.yaml is not valid YAML at line 2, column 15: mapping values are "
     "not allowed here"),
    ("name: mydata\nname: other\n", "mydata.yaml is not valid YAML at line 2, column 1: found duplicate key name "
     "(while constructing a mapping that starts at line 1, column 1)"),
], ids=["unclosed list", "two colons", "key given twice"])
@pytest.mark.parametrize("command", [["-m", "data=mydata"], ["data=mydata"], ["plan", "data=mydata"]],
                         ids=["sweep", "single run", "plan"])
def test_a_config_file_that_is_not_yaml_is_one_line(tmp_path, monkeypatch, capsys, text, said, command):
    err = _with_a_users_file(tmp_path, monkeypatch, capsys, "data/mydata.yaml", text, command)
    [line] = err.strip().splitlines()
    assert line == f"error: --config-dir conf: conf/data/{said}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]  # nothing written


@pytest.mark.parametrize("text,said", [
    ("learning_rate: fast\n", "lr/mine.yaml (a config file of group lr): learning_rate: Value 'fast' of type 'str' "
     "could not be converted to Float"),
    ("learning_rate: 1.0e-3\nlearnin_rate: 2\n", "lr/mine.yaml (a config file of group lr): learnin_rate is not a "
     "key of the config; did you mean learning_rate? (known there: learning_rate, lr_scheduler_type, "),
], ids=["a value of the wrong type", "a misspelt key"])
@pytest.mark.parametrize("command", [["-m", "lr=mine"], ["lr=mine"], ["plan", "lr=mine"]],
                         ids=["sweep", "single run", "plan"])
def test_a_bad_value_or_key_in_a_users_config_file_names_the_file_and_key(tmp_path, monkeypatch, capsys, text, said,
                                                                          command):
    err = _with_a_users_file(tmp_path, monkeypatch, capsys, "lr/mine.yaml", text, command)
    lines = [x for x in err.strip().splitlines() if not x.startswith("[20")]  # a log line before the refusal
    assert len(lines) == 1 and said in lines[0], err


def test_a_shipped_config_file_edited_into_bad_yaml_is_named(tmp_path):
    from sweeper import userconf

    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "default.yaml").write_text("hydra:\n  sweeper:\n    storage: 'sqlite:///x.db\n")
    assert userconf._syntax_problems(tmp_path, "conf") == (
        "conf/local/default.yaml is not valid YAML at line 4, column 1: found unexpected end of stream (while "
        "scanning a quoted scalar that starts at line 3, column 14)")


def _sweeper(*args):
    return subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_dashboard_on_a_busy_or_impossible_port(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(storage=url, study_name="s")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = _sweeper("dashboard", "--storage", url, "--port", str(port))
        assert proc.returncode == 2 and f"error: --port {port}: cannot listen on 127.0.0.1:{port}" in proc.stderr
    proc = _sweeper("dashboard", "--storage", url, "--port", "99999")
    assert proc.returncode == 2 and "error: --port 99999: a TCP port is 1..65535" in proc.stderr
    assert "Listening" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_report_out_where_nothing_can_be_written(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=url, study_name="s")
    study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={1: 1.0}, user_attrs={"max_steps": 1}))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = _sweeper("report", "--storage", url, "--out", str(blocker / "report"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: --out {blocker / 'report'}: cannot write the report there" in proc.stderr


@pytest.mark.slow
def test_a_study_name_that_needs_quoting_runs_and_resumes(tmp_path, cache_dir):
    import optuna

    name = "my study ü 日本 'v2'"
    args = ["-m", "seed=1", *FAST, f"hydra.sweeper.study_name={name!r}".replace("\\'", "\\\\'"),
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    for _ in range(2):  # the second run resumes: nothing new, no orphan RUNNING trial
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE"]
    assert (tmp_path / "sweeps" / name / "trial_0").is_dir()


def test_postgres_role_at_its_limit_leaves_no_study(tmp_path, cache_dir):
    """Refused before any study exists: nothing in the role's database (it could have created one there)."""
    import uuid

    url, name = _postgres(LIMITED_ROLE, limit=2)(tmp_path), f"limited-{uuid.uuid4().hex[:8]}"
    proc = run_in_process("-m", "seed=1,2", *FAST, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
                          f"hydra.sweeper.storage={url}", f"hydra.sweeper.study_name={name}")
    assert proc.returncode == 1 and "CONNECTION LIMIT 2" in proc.stderr, proc.stderr[-2000:]
    assert name not in _studies_in(LIMITED_ROLE)


def _sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", [_cut_short, _overwritten], ids=["cut short", "overwritten"])
@pytest.mark.parametrize("command", ["status", "report"])
def test_a_damaged_study_file_is_one_line_and_left_as_it_is(tmp_path, damage, command):
    path = damage(tmp_path)
    before = _sha(path)
    extra = ["--out", str(tmp_path / "report")] if command == "report" else []
    proc = sweeper_in_process(command, "--storage", f"sqlite:///{path}", *extra)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {path} is not a readable Optuna SQLite database (SQLite says: ")
    assert line.endswith("it was left as it is; restore it from a backup, or use another file (a new file starts new "
                         "studies)")
    assert _sha(path) == before and not (tmp_path / "report").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["optuna.db"]  # no journal, no lock file beside it


def test_a_damaged_study_file_is_left_as_it_is_by_a_sweep(tmp_path, cache_dir):
    path = _cut_short(tmp_path)
    before = _sha(path)
    proc = run_in_process("-m", "seed=1,2", *FAST, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
                          f"hydra.sweeper.storage=sqlite:///{path}")
    assert proc.returncode == 1 and f"{path} is not a readable Optuna SQLite database" in proc.stderr
    assert _sha(path) == before


@pytest.mark.parametrize("command", ["status", "report"])
def test_commands_on_a_postgresql_role_at_its_limit(tmp_path, command):
    """A command needs one connection: when the role has none left, one line naming the storage and the limit."""
    import sqlalchemy

    url = _postgres(LIMITED_ROLE, limit=1)(tmp_path)
    extra = ["--out", str(tmp_path / "report")] if command == "report" else []
    held = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool).connect()  # the role's one connection
    try:
        proc = sweeper_in_process(command, "--storage", url, *extra)
    finally:
        held.close()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "pa55w0rd" not in proc.stdout + proc.stderr
    assert (f"error: --storage postgresql://{LIMITED_ROLE}:***@127.0.0.1:5432/{LIMITED_ROLE}: role "
            f"'{LIMITED_ROLE}' is at its connection limit") in proc.stderr, proc.stderr


@pytest.mark.parametrize("out", [None, "a/b/report"], ids=["default folder", "--out"])
def test_a_report_of_an_unknown_study_leaves_no_folder(tmp_path, monkeypatch, capsys, out):
    """``report --study nope`` is refused after the storage opened: the report folder it was to write (the default
    ``outputs/report`` here, or ``--out``) is not left behind, empty, nor are the folders above it."""
    import optuna

    from sweeper import report_command

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(storage=url, study_name="demo-tiny")
    monkeypatch.chdir(tmp_path)
    assert report_command.report(url, ["nope"], out) == 2
    assert "error: --study 'nope' is not in the storage; studies there: ['demo-tiny']" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.db"]


@pytest.mark.parametrize("command", ["status", "report", "dashboard"])
def test_a_bad_storage_option_is_named_as_the_commands_option(tmp_path, monkeypatch, capsys, command):
    """``--storage`` given to status, report or dashboard: its line names ``--storage``, not the sweep's
    ``hydra.sweeper.storage`` (which the storage's checks say for a sweep)."""
    from sweeper import report_command, status_command

    monkeypatch.chdir(tmp_path)
    run = {"status": lambda: status_command.status("notaurl", None),
           "report": lambda: report_command.report("notaurl", None, str(tmp_path / "report")),
           "dashboard": lambda: report_command.dashboard("notaurl", "127.0.0.1", 1)}[command]
    assert run() == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --storage notaurl could not be opened: ArgumentError: ") and \
        "hydra.sweeper" not in err, err


# --------------------------------------------------------------------------- Ctrl-C


def _ctrl_c(args: list[str], when: str | float, env: dict | None = None) -> tuple[int, str]:
    """Run ``python *args`` in its own process group and press Ctrl-C (SIGINT to the group, as a terminal
    does) once a line of its output matches the regex ``when``, or after ``when`` seconds. Returns the exit
    code (as a shell reports it) and the whole output."""
    import os
    import re
    import signal
    import threading
    import time

    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < 300:
        if (isinstance(when, str) and any(re.search(when, x) for x in list(lines))) or (
                not isinstance(when, str) and time.monotonic() - start >= when):
            os.killpg(proc.pid, signal.SIGINT)
            break
        time.sleep(0.02)
    code = proc.wait(timeout=300)
    reader.join(timeout=10)
    return (128 - code if code < 0 else code), "".join(lines)


@pytest.mark.slow
def test_ctrl_c_while_the_sweep_prepares_its_data(tmp_path, cache_dir):
    code, out = _ctrl_c(["train.py", "-m", "seed=1,2", *FAST, f"paths.output_dir={tmp_path}",
                         f"paths.cache_dir={tmp_path / 'cache'}"], when=r"data demo: \d+ train rows")
    assert code == 130 and "Traceback" not in out, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("interrupted (Ctrl-C): "), out[-2000:]
    db = tmp_path / "optuna.db"
    if db.exists():  # the Ctrl-C came after the study was opened: nothing of it RUNNING
        import optuna

        for s in optuna.get_all_study_summaries(f"sqlite:///{db}"):
            assert s.n_trials == 0 or all(t.state.name != "RUNNING" for t in optuna.load_study(
                study_name=s.study_name, storage=f"sqlite:///{db}").trials)
    else:
        assert "before the sweep opened its study: nothing was recorded" in out


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [1.0, 2.5, 4.0])
def test_ctrl_c_in_report_and_status(tmp_path, seconds):
    """At any moment: one line, exit code 130, and the report files of the last whole run (never part of one)."""
    path = _study_file(tmp_path / "optuna.db")
    out_dir = tmp_path / "report"
    assert _sweeper("report", "--storage", f"sqlite:///{path}", "--out", str(out_dir)).returncode == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    for command in ("report", "status"):
        extra = ["--out", str(out_dir)] if command == "report" else []
        code, out = _ctrl_c(["-m", "sweeper", command, "--storage", f"sqlite:///{path}", *extra], when=seconds)
        assert "Traceback" not in out, out[-3000:]
        if code == 0:
            continue  # it finished before the Ctrl-C
        # one line, or none when the signal met the interpreter at its very start or end (before Python's handler
        # is in place, or after the command has written everything): killed then, with nothing half-done
        lines = [ln for ln in out.splitlines() if ln.startswith("interrupted (Ctrl-C): ")]
        assert code == 130 and len(lines) <= 1, out[-2000:]
        if not lines and command == "status":
            assert not out.strip() or "(as of" in out, out[-2000:]
        assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before  # no scratch folder, no half file


def test_a_read_only_study_file_is_refused_by_a_sweep_and_read_by_status(tmp_path, cache_dir):
    """An immutable file (``chattr +i``: read-only even to root, who ignores file modes)."""
    path = _study_file(tmp_path / "ro" / "optuna.db")
    before = _sha(path)
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        skip_or_fail(f"cannot make a file immutable here: {made.stderr.strip()}")
    try:
        proc = run_in_process("-m", "seed=1,2", *FAST, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
                              f"hydra.sweeper.storage=sqlite:///{path}")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"hydra.sweeper.storage=sqlite:///{path}: {path} cannot be written (read-only file)" in proc.stderr
        assert sweeper_in_process("status", "--storage", f"sqlite:///{path}").returncode == 0
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    assert _sha(path) == before


# Hydra's and OmegaConf's own composition errors, as they write them (several lines each)
HYDRA_ERRORS = [
    ("Error merging override schedule.max_steps=abc\nValue 'abc' of type 'str' could not be converted to Integer\n"
     "    full_key: schedule.max_steps\n    reference_type=ScheduleConfig\n    object_type=ScheduleConfig\n",
     "Error merging override schedule.max_steps=abc; Value 'abc' of type 'str' could not be converted to Integer"),
    ("Could not override 'schedul.max_steps'.\nTo append to your config use +schedul.max_steps=3\n"
     "Key 'schedul' not in 'Config'\n    full_key: schedul\n    object_type=Config\n",
     "Could not override 'schedul.max_steps': schedul is not a key of the config; did you mean schedule.max_steps=3? "
     "(known in the config: model, data, batch, schedule, lr, precision, peft, speed, eval, study, paths, tracking, "
     "seed, retry_on_oom, report_to)"),
    ("Could not override 'schedule.max_step'.\nTo append to your config use +schedule.max_step=10\n"
     "Key 'max_step' not in 'ScheduleConfig'\n    full_key: schedule.max_step\n    object_type=ScheduleConfig\n",
     "Could not override 'schedule.max_step': schedule.max_step is not a key of the config; did you mean "
     "schedule.max_steps=10? (known in schedule: max_steps, num_train_epochs, wsd)"),
    ("In 'config': Could not find 'schedule/undr'\n\nAvailable options in 'schedule':\n\tover\n\tsweet\n\tunder\n"
     "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf\n\tprovider=main, path=file:///x/conf\n",
     "In 'config': Could not find 'schedule/undr'; Available options in 'schedule': over, sweet, under"),
]


@pytest.mark.parametrize("given", ["4,6", "choice(4,6)", "tag(log, range(4,8))"])
def test_a_misspelt_swept_key_is_said_with_its_whole_value(compose_cfg, given):
    """The sweep composes each point (``schedule.max_step=4``): Hydra's refusal then names the point's value,
    which the did-you-mean would pass on without the rest of the sweep."""
    from hydra.errors import ConfigCompositionException

    from sweeper.config import one_line
    from sweeper.sweep.plugin import _whole_value

    with pytest.raises(ConfigCompositionException) as point:
        compose_cfg("schedule.max_step=4", hydra=False)
    e = _whole_value(point.value, ["+debug=fast", f"schedule.max_step={given}", "seed=1,2"])
    assert one_line(f"{e}\n{point.value.__cause__}") == (
        "Could not override 'schedule.max_step': schedule.max_step is not a key of the config; did you mean "
        f"schedule.max_steps={given}? (known in schedule: max_steps, num_train_epochs, wsd)")


@pytest.mark.parametrize("text,line", HYDRA_ERRORS, ids=["wrong type", "unknown key", "unknown key of a group",
                                                        "unknown option"])
def test_hydras_composition_errors_are_said_in_one_line(text, line):
    import io

    from sweeper.cli import _HYDRA_HINT, _OneLineRefusals
    from sweeper.config import one_line

    assert one_line(text) == line
    out = io.StringIO()
    stream = _OneLineRefusals(out)
    cut = text.find("Key '") if "Key '" in text else len(text)  # Hydra's message, then OmegaConf's cause
    for part in (text[:cut], text[cut:]):
        if part:
            stream.write(part)
    stream.write(_HYDRA_HINT)
    assert out.getvalue() == line + "\n"
    # a log line passes at once; held text with no hint after it is written as it came
    out = io.StringIO()
    stream = _OneLineRefusals(out)
    stream.write("[2026-12-04 05:00:00,000][sweeper][INFO] - a log line\n")
    assert out.getvalue().endswith("a log line\n")
    stream.write(text)
    stream.release()
    assert out.getvalue().endswith(text)


def test_a_runs_refusal_leaves_out_hydras_list_of_overrides_but_a_traceback_keeps_it():
    import io

    from sweeper.cli import _HYDRA_HINT, _OneLineRefusals

    job = "Error executing job with overrides: ['seed=-1']\n"
    out = io.StringIO()
    stream = _OneLineRefusals(out)
    for text in (job, "seed must be between 0 and 4294967295, but got -1; e.g. seed=42\n", _HYDRA_HINT):
        stream.write(text)
    stream.end()
    assert out.getvalue() == "seed must be between 0 and 4294967295, but got -1; e.g. seed=42\n"
    out = io.StringIO()
    stream = _OneLineRefusals(out)
    for text in (job, "Traceback (most recent call last):\n", "ZeroDivisionError: division by zero\n", _HYDRA_HINT):
        stream.write(text)
    stream.end()
    assert out.getvalue() == job + "Traceback (most recent call last):\nZeroDivisionError: division by zero\n" + _HYDRA_HINT


@pytest.mark.slow
@pytest.mark.parametrize("override,needle", [
    ("schedule.max_steps=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("schedul.max_steps=3", "schedul is not a key of the config; did you mean schedule.max_steps=3?"),
    ("schedule=undr", "Available options in 'schedule': epochs3, over, sweet, under, wsd_search"),
    ("schedule.max_steps=[1", "Error parsing override 'schedule.max_steps=[1': no viable alternative at input '[1'"),
], ids=["wrong type", "unknown key", "unknown option", "bad grammar"])
def test_a_composition_error_from_the_command_is_one_line(tmp_path, override, needle):
    proc = run_cli("-m", override, f"paths.output_dir={tmp_path}")
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.parametrize("argv,line", [
    (["-m", "seed=1,2", "lr.learning_rate=interval(1e-3"],
     "Error parsing override 'lr.learning_rate=interval(1e-3': no viable alternative at input 'interval(1e-3'; See "
     "https://hydra.cc/docs/1.2/advanced/override_grammar/basic for details"),
    (["-m", "hydra.sweeper.storage=postgresql://bob@db/x?password=pa55w0rd"],
     "Error parsing override 'hydra.sweeper.storage=postgresql://bob@db/x?password=***': mismatched input '=' "
     "expecting <EOF>; See https://hydra.cc/docs/1.2/advanced/override_grammar/basic for details"),
], ids=["unclosed interval", "unquoted URL with a password"])
def test_a_grammar_error_names_its_override_without_a_password(argv, line):
    import io

    from sweeper.cli import _HYDRA_HINT, _OneLineRefusals

    out = io.StringIO()
    stream = _OneLineRefusals(out, argv)
    hydra_says = line.split("': ", 1)[1].replace("; See", "\nSee") + "\n"
    stream.write(hydra_says)
    stream.write(_HYDRA_HINT)
    assert out.getvalue() == line + "\n"


@pytest.mark.parametrize("file_there", [False, True], ids=["new file", "file with another study"])
def test_a_refusal_after_the_study_was_opened_leaves_no_study(tmp_path, cache_dir, monkeypatch, file_there):
    """A refusal that comes once the command's study exists (the workers' plan, after the study's state is read)
    deletes the study it created, and the SQLite file it created with it."""
    import optuna

    from sweeper.sweep import launchers

    def refuse(*args, **kwargs):
        raise ValueError("hydra.sweeper.workers=auto: no visible GPU has room for the planned trial (a test's)")

    monkeypatch.setattr(launchers, "plan", refuse)
    db = tmp_path / "optuna.db"
    if file_there:
        optuna.create_study(study_name="other", storage=f"sqlite:///{db}")
    proc = run_in_process("-m", "seed=1,2", *FAST, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}")
    assert proc.returncode == 1 and "no visible GPU has room for the planned trial (a test's)" in proc.stderr
    if file_there:
        assert optuna.study.get_all_study_names(f"sqlite:///{db}") == ["other"]
    else:
        assert not db.exists() and not (tmp_path / "optuna.db.lock").exists()


@pytest.mark.parametrize("points", [
    [*FAST, "speed=auto,plain"], [*fast("batch."), "batch=auto,balanced"],
    [*fast("batch."), "batch=conservative,balanced"],
], ids=["speed auto and plain", "batch auto and balanced", "one effective batch split two ways"])
def test_points_that_compose_different_configs_are_not_one_run(tmp_path, cache_dir, monkeypatch, points):
    """On this CPU machine speed=auto runs as plain and batch=auto as 8x2 (balanced), but the points compose
    different configs (a SLURM submit node has no GPU while its workers do), as do 4x4 and 8x2 rows of one
    effective batch: the command is not refused as one run twice; it gets as far as the workers' plan, stopped
    there by the test."""
    from sweeper.sweep import launchers

    def stop(*args, **kwargs):
        raise ValueError("every check passed (a test's stop before any trial)")

    monkeypatch.setattr(launchers, "plan", stop)
    proc = run_in_process("-m", *points, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}")
    assert proc.returncode == 1 and "every check passed (a test's stop before any trial)" in proc.stderr, \
        proc.stderr[-2000:]
    assert "compose the same run" not in proc.stderr


def test_two_of_hydras_mode_flags_are_one_line(capsys):
    from sweeper.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["-m", "seed=1", "--cfg", "hydra"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip() == ("error: Only one of --run, --multirun, --cfg, --info and --shell_completion can be "
                           "specified; give one of them (--cfg and --info print the config without running)")


def test_a_misspelt_key_with_a_password_in_its_value_is_said_without_it():
    import io

    from sweeper.cli import _HYDRA_HINT, _OneLineRefusals

    override = "hydra.sweeper.storag=postgresql://bob:pa55w0rd@db/x"
    out = io.StringIO()
    stream = _OneLineRefusals(out, ["-m", override])
    stream.write(f"Could not override 'hydra.sweeper.storag'.\nTo append to your config use +{override}\n")
    stream.write("Key 'storag' not in 'SftSweepSweeperConf'\n    full_key: hydra.sweeper.storag\n")
    stream.write(_HYDRA_HINT)
    assert "did you mean hydra.sweeper.storage=postgresql://bob:***@db/x?" in out.getvalue()
    assert "pa55w0rd" not in out.getvalue()
