"""Load, check and split the training data (the ``data`` config group, :class:`sweeper.config.DataConfig`).

Accepted inputs: a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a hub dataset id, or
``demo`` (a small intent-classification set this module generates). Rows must be in one of TRL's
two formats: conversational ``messages`` or ``prompt``/``completion``. Every check raises one
``ValueError`` (or ``FileNotFoundError``) that names the option, the file and, for JSON lines, the
line number.

Loading goes through ``datasets`` so the Arrow cache and fingerprints are reused across trials.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sweeper.config import DataConfig

__all__ = ["FORMATS", "Splits", "check_prepared", "demo_corpus", "demo_rows", "detect_format", "load"]

log = logging.getLogger(__name__)

_LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMATS = ("messages", "prompt_completion")


@dataclass
class Splits:
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset
    format: str  # "messages" | "prompt_completion"
    source: str  # resolved path or hub id, for logs
    all_train: Any = None  # the train rows before data.max_train_rows (None: the same as train)


# --------------------------------------------------------------------------- demo data

_DEMO_INTENTS: dict[str, list[str]] = {
    "check_balance": [
        "what is my {acct} balance", "how much money is in my {acct} account",
        "show the balance of my {acct}", "can you tell me my {acct} balance {when}",
    ],
    "transfer_money": [
        "send {amount} to {person}", "transfer {amount} from {acct} to {person}",
        "i want to move {amount} to {person} {when}", "pay {person} {amount}",
    ],
    "card_lost": [
        "i lost my {card}", "my {card} was stolen {when}", "i can't find my {card} anywhere",
        "block my {card} it is gone",
    ],
    "book_flight": [
        "book a flight to {city} {when}", "i need a plane ticket to {city}",
        "find me flights from {city} to {city2}", "get me a seat on a flight to {city} {when}",
    ],
    "weather": [
        "what is the weather in {city} {when}", "will it rain in {city} {when}",
        "how cold is it in {city}", "forecast for {city} {when}",
    ],
    "play_music": [
        "play some {genre}", "put on {genre} music", "i want to hear {genre} {when}",
        "start a {genre} playlist",
    ],
    "set_alarm": [
        "set an alarm for {time}", "wake me up at {time} {when}", "alarm at {time} please",
        "remind me at {time} to wake up",
    ],
    "restaurant": [
        "book a table for {n} at a {food} place", "find a {food} restaurant in {city}",
        "reserve dinner for {n} {when}", "i want {food} food for {n} people",
    ],
    "cancel_order": [
        "cancel my order from {when}", "i don't want the {item} anymore", "stop my {item} order",
        "please cancel the {item} i bought {when}",
    ],
    "track_package": [
        "where is my {item}", "track the {item} i ordered {when}", "has my {item} shipped yet",
        "when will my {item} arrive",
    ],
    "translate": [
        "how do you say {phrase} in {lang}", "translate {phrase} to {lang}",
        "what is {phrase} in {lang}", "say {phrase} in {lang} please",
    ],
    "small_talk": [
        "how are you {when}", "tell me a joke", "what is your name", "are you a robot",
    ],
}
_DEMO_SLOTS: dict[str, list[str]] = {
    "acct": ["checking", "savings", "joint", "business", "student"],
    "amount": ["$20", "$150", "50 euros", "$1,000", "300 dollars", "£75"],
    "person": ["mom", "alex", "my landlord", "sam", "the plumber", "jordan"],
    "when": ["today", "tomorrow", "this weekend", "right now", "next monday", "tonight", "yesterday"],
    "card": ["credit card", "debit card", "visa card", "bank card"],
    "city": ["paris", "tokyo", "new york", "berlin", "lima", "cairo", "oslo"],
    "city2": ["rome", "boston", "madrid", "seoul", "sydney"],
    "genre": ["jazz", "rock", "classical", "hip hop", "country", "lo-fi"],
    "time": ["6 am", "7:30", "noon", "5:45 pm", "midnight"],
    "n": ["two", "four", "six", "3", "8"],
    "food": ["thai", "italian", "sushi", "mexican", "indian", "vegan"],
    "item": ["shoes", "laptop", "package", "headphones", "book", "jacket"],
    "phrase": ["good morning", "thank you", "where is the station", "how much"],
    "lang": ["french", "spanish", "german", "japanese", "italian"],
}


_DEMO_LABEL_NOISE = 0.1


def demo_rows(n_rows: int, seed: int) -> list[dict]:
    """``n_rows`` intent-classification rows in TRL messages format, deterministic for ``seed``."""
    rng = random.Random(seed)
    intents = sorted(_DEMO_INTENTS)
    rows = []
    for i in range(n_rows):
        intent = intents[i % len(intents)]
        template = rng.choice(_DEMO_INTENTS[intent])
        text = template.format(**{k: rng.choice(v) for k, v in _DEMO_SLOTS.items()})
        if rng.random() < 0.3:
            text = rng.choice(["hey ", "please ", "hi, ", "ok so ", ""]) + text
        if rng.random() < 0.3:
            text += rng.choice(["?", "!", " thanks", " asap", "."])
        if rng.random() < _DEMO_LABEL_NOISE:  # annotation noise: the eval loss has a floor to over-fit past
            intent = rng.choice(intents)
        rows.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": intent}]})
    rng.shuffle(rows)
    return rows


def demo_corpus() -> list[str]:
    """Texts the tiny tokenizer is trained on: the demo set plus every template word."""
    texts = [m["content"] for r in demo_rows(2000, 0) for m in r["messages"]]
    texts += [t for ts in _DEMO_INTENTS.values() for t in ts] + [s for ss in _DEMO_SLOTS.values() for s in ss]
    return texts


def _write_demo(cache_dir: Path, n_rows: int, seed: int) -> Path:
    path = cache_dir / "data" / f"demo-{n_rows}-seed{seed}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with tmp.open("w", encoding="utf-8") as f:
            for row in demo_rows(n_rows, seed):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)  # atomic: parallel workers never read half a file
    return path


# --------------------------------------------------------------------------- loading


def _resolve_local(path_str: str) -> Path:
    path = Path(path_str).expanduser()
    if not path.is_absolute():
        try:
            from hydra.utils import get_original_cwd

            path = Path(get_original_cwd()) / path
        except (ImportError, ValueError):
            path = Path.cwd() / path
    return path


def _check_jsonl(path: Path, key: str) -> int:
    """Parse every line; name the first bad one. Returns the number of rows."""
    rows = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{key}: {path} line {lineno} is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                 f"column {e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{key}: {path} line {lineno} is not valid JSON ({e.msg} at column {e.colno}); "
                    "each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(f"{key}: {path} line {lineno} is a JSON {type(obj).__name__}, not an object")
            rows += 1
    return rows


def _load_one(path_str: str, split: str | None, key: str, cache_dir: Path) -> tuple[Any, str]:
    import datasets

    suffix = Path(path_str).suffix.lower()
    local = _resolve_local(path_str)
    if suffix in _LOCAL_SUFFIXES or local.exists():
        if not local.is_file():
            raise FileNotFoundError(
                f"{key}: file not found: {local} (accepted: .jsonl, .json, .csv, .parquet files or a hub id)"
            )
        if local.stat().st_size == 0:
            raise ValueError(f"{key}: {local} is empty; it needs at least one row")
        builder = _LOCAL_SUFFIXES.get(suffix)
        if builder is None:
            raise ValueError(
                f"{key}: {local} has suffix {suffix!r}; accepted are {sorted(_LOCAL_SUFFIXES)}"
            )
        if suffix == ".jsonl" and _check_jsonl(local, key) == 0:
            raise ValueError(f"{key}: {local} has no rows (only blank lines)")
        try:
            ds = datasets.load_dataset(
                builder, data_files=str(local), split="train", cache_dir=str(cache_dir / "datasets")
            )
        except Exception as e:  # datasets wraps parser errors in its own types
            raise ValueError(f"{key}: could not read {local}: {e}") from e
        if len(ds) == 0:
            raise ValueError(f"{key}: {local} has no rows")
        return ds, str(local)
    try:
        ds = datasets.load_dataset(path_str, split=split or "train", cache_dir=str(cache_dir / "datasets"))
    except Exception as e:
        raise ValueError(
            f"{key}: {path_str!r} is neither an existing file nor a loadable hub dataset ({type(e).__name__}: {e})"
        ) from e
    return ds, path_str


def detect_format(columns: list[str], key: str, source: str) -> str:
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    raise ValueError(
        f"{key}: rows of {source} need a 'messages' column (TRL conversational format) or "
        f"'prompt' and 'completion' columns, but found columns {sorted(columns)}"
    )


def _row_problem(fmt: str, row: dict) -> str | None:
    """Why one row cannot be trained on (None: it can)."""
    if fmt == "messages":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and (isinstance(m.get("content"), str) or (m.get("content") is None and m.get("tool_calls")))
                for m in msgs):
            return "'messages' must be a non-empty list of {'role': ..., 'content': <text>} objects"
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        if not answers:
            roles = sorted({m["role"] for m in msgs})
            return f"no assistant message to learn from (roles: {', '.join(roles)})"
        if not any((a or "").strip() for a in answers) and not any(
                m.get("tool_calls") for m in msgs if m["role"] == "assistant"):
            return "its assistant messages are empty"
        return None
    prompt, completion = row.get("prompt"), row.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if isinstance(value, str):
            if name == "completion" and not value.strip():
                return "an empty 'completion'"
        elif isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
            if name == "completion" and not any(str(m["content"]).strip() for m in value):
                return "an empty 'completion'"
        else:
            return f"'{name}' must be text (or a list of messages), but is {type(value).__name__}"
    return None


def _check_rows(ds: Any, fmt: str, key: str, source: str, most: int = 5) -> None:
    """Check every row where TRL would fail later with a less clear error; one error naming the first
    few bad rows (1-based, in file order) and how many there are."""
    columns = ["messages"] if fmt == "messages" else ["prompt", "completion"]
    table = ds.with_format("arrow")[:]  # the rows in order, as one Arrow table (indices mapping applied)
    data = {c: table[c].to_pylist() for c in columns}  # one pass over plain lists, not row by row
    bad = []
    for i in range(len(ds)):
        why = _row_problem(fmt, {c: data[c][i] for c in columns})
        if why is not None:
            bad.append((i + 1, why))
    if bad:
        shown = "; ".join(f"row {n}: {why}" for n, why in bad[:most])
        more = f" (first {most} shown)" if len(bad) > most else ""
        raise ValueError(f"{key}: {len(bad)} of {len(ds)} rows of {source} cannot be trained on: {shown}{more}; "
                         "fix or drop them")


def load(data: DataConfig, cache_dir: str | Path) -> Splits:
    """Load train and eval splits for a ``data`` config; raise one clear error on bad input.

    Eval comes from ``eval_path`` when given, else a seeded ``eval_fraction`` of the shuffled
    train rows (the remainder trains). ``max_train_rows``/``max_eval_rows`` cap after shuffling.
    """
    cache_dir = Path(cache_dir)
    if data.train_path == "demo":
        train_src = str(_write_demo(cache_dir, int(data.demo_rows or 1200), int(data.seed)))
    else:
        train_src = data.train_path
    train, source = _load_one(train_src, data.train_split, "data.train_path", cache_dir)
    fmt = detect_format(train.column_names, "data.train_path", source)
    keep = ["messages"] if fmt == "messages" else ["prompt", "completion"]
    train = train.select_columns(keep)
    _check_rows(train, fmt, "data.train_path", source)
    train = train.shuffle(seed=int(data.seed))

    if data.eval_path is not None:
        evals, esource = _load_one(data.eval_path, data.eval_split, "data.eval_path", cache_dir)
        efmt = detect_format(evals.column_names, "data.eval_path", esource)
        if efmt != fmt:
            raise ValueError(
                f"data.eval_path: {esource} is in {efmt} format but data.train_path is in {fmt}; use one format"
            )
        evals = evals.select_columns(keep)
        _check_rows(evals, fmt, "data.eval_path", esource)
    else:
        n = len(train)
        n_eval = int(round(n * float(data.eval_fraction)))
        if n_eval < 1 or n_eval >= n:
            raise ValueError(
                f"data.eval_fraction={data.eval_fraction} of {n} rows in {source} leaves "
                f"{n_eval} eval and {n - n_eval} train rows; both need at least one. Add rows, "
                "change data.eval_fraction, or give data.eval_path"
            )
        evals = train.select(range(n_eval))
        train = train.select(range(n_eval, n))
    if data.max_eval_rows is not None:
        if data.max_eval_rows < 1:
            raise ValueError(f"data.max_eval_rows must be >= 1 or null, but got {data.max_eval_rows}")
        evals = evals.select(range(min(len(evals), int(data.max_eval_rows))))
    all_train = None
    if data.max_train_rows is not None:
        if data.max_train_rows < 1:
            raise ValueError(f"data.max_train_rows must be >= 1 or null, but got {data.max_train_rows}")
        all_train = train
        train = train.select(range(min(len(train), int(data.max_train_rows))))
    log.info("data %s: %d train rows, %d eval rows (%s format) from %s",
             data.name, len(train), len(evals), fmt, source)
    return Splits(train=train, eval=evals, format=fmt, source=source, all_train=all_train)


def check_prepared(splits: Splits, data: DataConfig, train_rows: int, eval_rows: int) -> None:
    """Raise one clear error when TRL's preparation (truncation at ``data.max_length``, which drops a row
    whose loss tokens are all cut) leaves no train row to learn from or no eval row to score: found
    before training, not at the first evaluation."""
    where = {"train": f"data.train_path ({splits.source})",
             "eval": f"data.eval_path ({data.eval_path})" if data.eval_path is not None
             else f"the eval rows held out of data.train_path ({splits.source})"}
    for split, before, after in (("train", len(splits.train), train_rows), ("eval", len(splits.eval), eval_rows)):
        if before and not after:
            raise ValueError(
                f"{where[split]}: 0 of {before} {split} rows keep a token to "
                f"{'learn from' if split == 'train' else 'score'} after truncation at data.max_length="
                f"{data.max_length} (the {'completion' if splits.format != 'messages' else 'assistant turn'} "
                "starts beyond it); raise data.max_length or shorten the prompts")
