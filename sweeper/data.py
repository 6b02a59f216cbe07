"""Load, check and split the training data (the ``data`` config group, :class:`sweeper.config.DataConfig`).

Accepted inputs: a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file (its path read literally:
``[``, ``*`` and ``?`` in a name are not glob patterns), a folder written by ``datasets``'
``save_to_disk``, a hub dataset id, or ``demo`` (a small intent-classification set this module
generates). Rows are in one of TRL's two formats, conversational ``messages`` or
``prompt``/``completion``, or in one this module converts (:data:`CONVERSIONS`): ShareGPT
``conversations`` (``from``/``value``) and Alpaca ``instruction``/``input``/``output`` become
``messages``, plain ``text`` becomes a completion with an empty prompt (TRL's language modeling: the
loss is on every token). Every row's shape is checked once, on the decoded values, before any trial;
every check raises one ``ValueError`` (or ``FileNotFoundError``) that names the option, the file and the
row numbers (1-based, in file order; a JSONL file's rows by their line numbers). Tool calls (``tool_calls``,
``tool`` messages) are refused as not supported. Eval rows that are also train rows are counted and warned about.

Loading goes through ``datasets`` so the Arrow cache and fingerprints are reused across trials.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from omegaconf import OmegaConf

if TYPE_CHECKING:
    from sweeper.config import DataConfig

__all__ = ["CONVERSIONS", "FORMATS", "Splits", "check_prepared", "check_train_size", "demo_corpus", "demo_rows", "detect_format", "load"]

log = logging.getLogger(__name__)

_LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMATS = ("messages", "prompt_completion")
# formats read and converted to one of TRL's: {detected: (its columns, the TRL format, words for the log)}
CONVERSIONS = {
    "sharegpt": (("conversations",), "messages", "ShareGPT 'conversations' rows, converted to TRL messages"),
    "alpaca": (("instruction", "input", "output"), "messages",
               "Alpaca instruction/input/output rows, converted to TRL messages (user: instruction and input; "
               "assistant: output)"),
    "text": (("text",), "prompt_completion",
             "plain 'text' rows, converted to a completion with an empty prompt (language modeling: the loss is "
             "on every token)"),
}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}
_TOOL_ROLES = {"tool", "function", "function_call", "observation", "ipython", "tool_call", "tool_response"}
_ROLES = ("system", "user", "assistant")
_GLOB_CHARS = set("*?[]")
_NO_DATA = "corresponds to no data"  # datasets' words for a file of no rows (Instruction "train" corresponds ...)
_SHARED_DATA_ENV = "SFT_SWEEP_SHARED_DATA"
_WARNED: set[str] = set()  # the warnings this process has logged (each is said once)


@dataclass
class Splits:
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset
    format: str  # "messages" | "prompt_completion" (TRL's)
    source: str  # resolved path or hub id, for logs
    all_train: Any = None  # the train rows before data.max_train_rows (None: the same as train)
    detected: str = ""  # the format read from the file: one of FORMATS or a key of CONVERSIONS
    overlap: int = 0  # eval rows that are also train rows (the same text)
    notes: list = field(default_factory=list)  # what the plan shows: a format converted, eval rows seen in train


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


def _check_jsonl(path: Path, key: str) -> tuple[int, list[int]]:
    """Parse every line; name the first bad one. Returns the number of rows and the numbers of the blank lines
    (ascending), which the loader skips: :func:`_lines` names a row by its line."""
    rows, blanks = 0, []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM (Windows editors) is fine
            except UnicodeDecodeError as e:
                raise ValueError(f"{key}: {path} line {lineno} is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                 f"column {e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                blanks.append(lineno)
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # without its newline: a line cut short errs at its end
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{key}: {path} line {lineno} is not valid JSON ({e.msg} at column {e.colno}); "
                    "each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(f"{key}: {path} line {lineno} is a JSON {type(obj).__name__}, not an object")
            rows += 1
    return rows, blanks


def _lines(blanks: list[int]) -> Callable[[int], str]:
    """Names a JSONL file's 1-based row by the line that holds it (``line N``), given the file's blank lines
    (:func:`_check_jsonl`), which the loader skips."""
    def where(row: int) -> str:
        line = row
        for b in blanks:
            if b > line:
                break
            line += 1
        return f"line {line}"
    return where


def _check_csv(path: Path, key: str) -> None:
    """Parse the CSV as the loader will (a header line, then rows); name the first line it cannot read: not
    UTF-8, an unclosed quote, or more fields than the header (a comma in an unquoted field); refuse a file of
    no rows (a header line alone)."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header = next(reader, None) or []
            rows = 0
            for row in reader:
                rows += any(field.strip() for field in row)
                if len(row) > len(header):
                    raise ValueError(
                        f"{key}: {path} line {reader.line_num} has {len(row)} fields but the header has {len(header)} "
                        f"({', '.join(header)}); put a field holding a comma in double quotes")
    except csv.Error as e:
        raise ValueError(f"{key}: {path} line {reader.line_num} is not valid CSV ({e}); close each quoted field "
                         "with a double quote and write a quote inside one as two") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{key}: {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file as "
                         "UTF-8") from None
    if not rows:
        raise ValueError(_no_rows(key, path, f"only its header line, {','.join(header)}" if header else "no line"))


def _parquet_rows(path: Path) -> int | None:
    """The row count in a Parquet file's footer (None when it has none to read: the loader says why)."""
    try:
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows
    except Exception:
        return None


def _no_rows(key: str, source: Any, what: str) -> str:
    """The one line for a file (or set) of no rows; ``what``: what it holds instead."""
    return f"{key}: {source} has no rows ({what}); it needs at least one row"


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost exception: datasets wraps its parsers' errors in its own."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _missing_hint(path_str: str) -> str:
    """Where a missing file of the shipped data options is looked for: they read their files under
    ``$SFT_SWEEP_SHARED_DATA`` (``conf/data/banking77.yaml`` and the like)."""
    root = os.environ.get(_SHARED_DATA_ENV)
    if (root and path_str.startswith(root)) or (not root and "shared/data/" in path_str):
        return (f"; the shipped data options read their files under ${_SHARED_DATA_ENV} "
                f"({'set to ' + repr(root) if root else 'not set, so ../shared/data relative to the folder the command starts in'}): "
                f"set {_SHARED_DATA_ENV} to the folder that holds banking77/, snips/, gsm8k/")
    return ""


def _literal(local: Path, suffix: str, cache_dir: Path, key: str) -> Path:
    """A path ``datasets`` reads as exactly this file: it takes ``data_files`` as glob patterns, so a name
    holding ``[``, ``]``, ``*`` or ``?`` is read through a link without them in the cache folder."""
    if not _GLOB_CHARS & set(str(local)):
        return local
    import hashlib

    link = cache_dir / "data" / "literal" / (hashlib.sha1(str(local).encode()).hexdigest()[:16] + suffix)
    if _GLOB_CHARS & set(str(link)):
        raise ValueError(f"{key}: {local} holds glob characters ({''.join(sorted(_GLOB_CHARS & set(str(local))))}) "
                         f"and so does paths.cache_dir={cache_dir}, so it cannot be read literally; rename the "
                         "file or move the cache")
    link.parent.mkdir(parents=True, exist_ok=True)
    if not (link.is_symlink() and os.readlink(link) == str(local)):
        tmp = link.with_name(f"{link.name}.tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(local)
        os.replace(tmp, link)  # atomic: parallel workers see the old link or the new one
    return link


def _is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``)."""
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file() \
        or (folder / "state.json").is_file()


def _load_from_disk(folder: Path, split: str | None, key: str) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise ValueError(f"{key}: {folder} looks like a datasets save_to_disk folder but could not be read "
                         f"({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        want = split or "train"
        if want not in ds:
            raise ValueError(f"{key}: {folder} holds the splits {sorted(ds)}, not {want!r}; set "
                             f"{key.replace('_path', '_split')} to one of them")
        ds = ds[want]
    return ds


def _load_one(path_str: str, split: str | None, key: str, cache_dir: Path
              ) -> tuple[Any, str, Callable[[int], str] | None]:
    """``(dataset, source, where)``: ``where`` names a 1-based row as its place in the source (a JSONL file's
    ``line N``), None where that is ``row N``."""
    import datasets

    suffix = Path(path_str).suffix.lower()
    local = _resolve_local(path_str)
    if local.is_dir():
        if _is_saved_dataset(local):
            ds = _load_from_disk(local, split, key)
        else:
            raise ValueError(
                f"{key}: {local} is a folder, not a data file; give one .jsonl, .json, .csv or .parquet file, a "
                "folder written by datasets' save_to_disk, or a hub id")
        if len(ds) == 0:
            raise ValueError(_no_rows(key, local, "a saved dataset of 0 rows"))
        return ds, str(local), None
    if suffix in _LOCAL_SUFFIXES or local.exists():
        if not local.is_file():
            raise FileNotFoundError(
                f"{key}: file not found: {local} (accepted: .jsonl, .json, .csv, .parquet files, a datasets "
                f"save_to_disk folder or a hub id){_missing_hint(path_str)}")
        if local.stat().st_size == 0:
            raise ValueError(_no_rows(key, local, "an empty file"))
        builder = _LOCAL_SUFFIXES.get(suffix)
        if builder is None:
            raise ValueError(
                f"{key}: {local} has suffix {suffix!r}; accepted are {sorted(_LOCAL_SUFFIXES)}"
            )
        where = None
        if suffix == ".jsonl":
            rows, blanks = _check_jsonl(local, key)
            if rows == 0:
                raise ValueError(_no_rows(key, local, "only blank lines"))
            where = _lines(blanks)
        if suffix == ".csv":
            _check_csv(local, key)
        if suffix == ".parquet" and _parquet_rows(local) == 0:
            raise ValueError(_no_rows(key, local, "a Parquet table of 0 rows"))
        try:
            ds = datasets.load_dataset(
                builder, data_files=str(_literal(local, suffix, cache_dir, key)), split="train",
                cache_dir=str(cache_dir / "datasets")
            )
        except Exception as e:  # datasets wraps parser errors in its own types
            if _NO_DATA in _root_cause(e):  # a JSON [] or a Parquet table of 0 rows
                raise ValueError(_no_rows(key, local, "an empty JSON list" if suffix == ".json" else "0 rows in it"
                                          )) from None
            raise ValueError(f"{key}: could not read {local}: {_root_cause(e)}") from e
        if len(ds) == 0:
            raise ValueError(_no_rows(key, local, "0 rows in it"))
        return ds, str(local), where
    try:
        ds = datasets.load_dataset(path_str, split=split or "train", cache_dir=str(cache_dir / "datasets"))
    except Exception as e:
        raise ValueError(
            f"{key}: {path_str!r} is neither an existing file nor a loadable hub dataset ({type(e).__name__}: {e})"
            f"{_missing_hint(path_str)}"
        ) from e
    if len(ds) == 0:
        raise ValueError(_no_rows(key, repr(path_str), f"its split {split or 'train'!r} is empty"))
    return ds, path_str, None


def detect_format(columns: list[str], key: str, source: str) -> str:
    """The format of rows with ``columns``: one of :data:`FORMATS` (TRL's) or a key of :data:`CONVERSIONS`."""
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    raise ValueError(
        f"{key}: rows of {source} need a 'messages' column (TRL conversational format), 'prompt' and "
        "'completion' columns, a ShareGPT 'conversations' column, Alpaca 'instruction'/'input'/'output' columns "
        f"or a 'text' column, but found columns {sorted(columns)}"
    )


def _columns(fmt: str, present: list[str]) -> list[str]:
    """The columns a row of ``fmt`` is read from (Alpaca's ``input`` only when the file has it)."""
    if fmt == "messages":
        return ["messages"]
    if fmt == "prompt_completion":
        return ["prompt", "completion"]
    return [c for c in CONVERSIONS[fmt][0] if c in present]


def _kind(value: Any) -> str:
    if value is None:
        return "missing (null)"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    return f"a {type(value).__name__}" + (f" ({value!r:.40})" if isinstance(value, (list, dict)) else "")


_TOOLS = ("tool calls are not supported (an assistant message with 'tool_calls', or a tool result); drop these "
          "rows or write the calls and results as plain text")


def _message_problem(msgs: Any, field: str, need_answer: bool) -> str | None:
    """Why a list of chat messages (``messages``, or a conversational prompt/completion) cannot be trained on."""
    if not isinstance(msgs, list) or not msgs:
        return f"'{field}' must be a non-empty list of {{'role': ..., 'content': <text>}} objects, but is {_kind(msgs)}"
    for j, m in enumerate(msgs):
        where = f"{field}[{j}]"
        if not isinstance(m, dict):
            return f"{where} must be a {{'role': ..., 'content': <text>}} object, but is {_kind(m)}"
        role = m.get("role")
        if m.get("tool_calls") or role in _TOOL_ROLES:
            return f"{where} is a tool {'call' if m.get('tool_calls') else 'result'}: {_TOOLS}"
        if role not in _ROLES:
            return f"{where}.role must be one of {', '.join(_ROLES)}, but is {role!r}"
        if not isinstance(m.get("content"), str):
            return f"{where}.content must be text, but is {_kind(m.get('content'))}"
    if need_answer:
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        if not answers:
            return f"no assistant message to learn from (roles: {', '.join(sorted({m['role'] for m in msgs}))})"
        if not any(a.strip() for a in answers):
            return "its assistant messages are empty"
    return None


def _row_problem(fmt: str, row: dict) -> str | None:
    """Why one row (decoded values) cannot be trained on (None: it can)."""
    if fmt == "messages":
        return _message_problem(row.get("messages"), "messages", True)
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            return f"'conversations' must be a non-empty list of {{'from': ..., 'value': <text>}}, but is {_kind(turns)}"
        msgs = []
        for j, t in enumerate(turns):
            if not isinstance(t, dict):
                return f"conversations[{j}] must be a {{'from': ..., 'value': <text>}} object, but is {_kind(t)}"
            who = t.get("from")
            if who in _TOOL_ROLES:
                return f"conversations[{j}] is a tool turn (from {who!r}): {_TOOLS}"
            if who not in _SHAREGPT_ROLES:
                return f"conversations[{j}].from must be one of human, gpt, system, but is {who!r}"
            if not isinstance(t.get("value"), str):
                return f"conversations[{j}].value must be text, but is {_kind(t.get('value'))}"
            msgs.append({"role": _SHAREGPT_ROLES[who], "content": t["value"]})
        return _message_problem(msgs, "conversations", True)
    if fmt == "alpaca":
        for name in ("instruction", "input", "output"):
            value = row.get(name)
            if not isinstance(value, str) and not (name == "input" and value is None):
                return f"'{name}' must be text, but is {_kind(value)}"
        if not row["output"].strip():
            return "an empty 'output'"
        return None
    if fmt == "text":
        value = row.get("text")
        if not isinstance(value, str):
            return f"'text' must be text, but is {_kind(value)}"
        return None if value.strip() else "an empty 'text'"
    for name in ("prompt", "completion"):
        value = row.get(name)
        if isinstance(value, str):
            if name == "completion" and not value.strip():
                return "an empty 'completion'"
        elif isinstance(value, list):
            why = _message_problem(value, name, False)
            if why is not None:
                return why
            if name == "completion" and not any(m["content"].strip() for m in value):
                return "an empty 'completion'"
        else:
            return f"'{name}' must be text (or a list of messages), but is {_kind(value)}"
    if isinstance(row["prompt"], list) != isinstance(row["completion"], list):
        return "'prompt' and 'completion' must both be text or both lists of messages"
    return None


def _check_rows(ds: Any, fmt: str, key: str, source: str, most: int = 5,
                where: Callable[[int], str] | None = None) -> None:
    """Check every row, on its decoded values (a JSON column keeps a number a number), where TRL or the
    chat template would fail later with a less clear error; one error naming the first few bad rows
    (1-based, in file order; ``where(n)`` names row ``n`` instead, e.g. a JSONL file's ``line N``), the field
    and the value's kind, and how many there are."""
    columns = _columns(fmt, ds.column_names)
    data = ds.select_columns(columns)[:]  # decoded python values, column by column
    bad = []
    for i in range(len(ds)):
        why = _row_problem(fmt, {c: data[c][i] for c in columns})
        if why is not None:
            bad.append((i + 1, why))
    if bad:
        shown = "; ".join(f"{where(n) if where else f'row {n}'}: {why}" for n, why in bad[:most])
        more = f" (first {most} shown)" if len(bad) > most else ""
        raise ValueError(f"{key}: {len(bad)} of {len(ds)} rows of {source} cannot be trained on: {shown}{more}; "
                         "fix or drop them")


def _sharegpt_row(row: dict) -> dict:
    return {"messages": [{"role": _SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]}


def _alpaca_row(row: dict) -> dict:
    extra = (row.get("input") or "").strip()
    user = row["instruction"] + (f"\n\n{extra}" if extra else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}


def _text_row(row: dict) -> dict:
    return {"prompt": "", "completion": row["text"]}


_CONVERTERS = {"sharegpt": _sharegpt_row, "alpaca": _alpaca_row, "text": _text_row}


def _read(path: str, split: str | None, key: str, cache_dir: Path) -> tuple[Any, str, str]:
    """One file (or hub set) as TRL rows: ``(dataset, source, detected format)``; every row checked first."""
    ds, source, where = _load_one(path, split, key, cache_dir)
    detected = detect_format(ds.column_names, key, source)
    ds = ds.select_columns(_columns(detected, ds.column_names))
    _check_rows(ds, detected, key, source, where=where)
    if detected in _CONVERTERS:  # a named function: datasets' fingerprint caches the result across trials
        ds = ds.map(_CONVERTERS[detected], remove_columns=ds.column_names, desc=f"converting {detected} rows")
    return ds, source, detected


def _row_keys(ds: Any) -> list[str]:
    """One text per row, equal for rows of equal content (for the overlap count)."""
    table = ds.with_format("arrow")[:]
    cols = {c: table[c].to_pylist() for c in ds.column_names}
    return [json.dumps([cols[c][i] for c in ds.column_names], sort_keys=True, default=str) for i in range(len(ds))]


def _overlap(train: Any, evals: Any) -> int:
    """How many eval rows are also train rows (the same content)."""
    seen = set(_row_keys(train))
    return sum(k in seen for k in _row_keys(evals))


# splits loaded in this process (a sweep's worker runs its trials in one process, after its pre-flight loaded the
# same data): key -> splits, the key naming the config and each local file's size and modification time
_LOADED: dict[tuple, Splits] = {}


def _load_key(data: DataConfig, cache_dir: Path) -> tuple | None:
    """What a load of ``data`` depends on, or None where it cannot be told without reading (a hub set)."""
    stats = []
    for path in (data.train_path, data.eval_path):
        if path is None or path == "demo":
            continue
        p = Path(str(path)).expanduser()
        if not p.exists():
            return None
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        stats += [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    try:
        text = OmegaConf.to_yaml(data, resolve=True)
    except Exception:  # not a config (a caller's own object): read it each time
        return None
    return text, str(cache_dir.resolve()), tuple(stats)


def load(data: DataConfig, cache_dir: str | Path) -> Splits:
    """Load train and eval splits for a ``data`` config; raise one clear error on bad input.

    Eval comes from ``eval_path`` when given, else a seeded ``eval_fraction`` of the shuffled
    train rows (the remainder trains). ``max_train_rows``/``max_eval_rows`` cap after shuffling.
    Eval rows that are also train rows (a copied eval file, repeated rows split by ``eval_fraction``)
    are counted (``Splits.overlap``) and warned about, once per process (a sweep's trials load the data its
    pre-flight loaded): their eval loss measures memorisation. Local files unchanged since this process loaded
    them with the same config (a sweep's pre-flight, then its trials) are not read and checked again.
    """
    cache_dir = Path(cache_dir)
    key = _load_key(data, cache_dir)
    splits = _LOADED.get(key) if key is not None else None
    if splits is None:
        splits = _load(data, cache_dir)
        if key is not None:
            _LOADED[key] = splits
    log.info("data %s: %d train rows, %d eval rows (%s format) from %s", data.name, len(splits.train),
             len(splits.eval), splits.format, splits.source)
    return dataclasses.replace(splits, notes=list(splits.notes))


def _load(data: DataConfig, cache_dir: Path) -> Splits:
    if data.train_path == "demo":
        train_src = str(_write_demo(cache_dir, int(data.demo_rows or 1200), int(data.seed)))
    else:
        train_src = data.train_path
    train, source, detected = _read(train_src, data.train_split, "data.train_path", cache_dir)
    fmt = CONVERSIONS[detected][1] if detected in CONVERSIONS else detected
    train = train.shuffle(seed=int(data.seed))

    if data.eval_path is not None:
        evals, esource, edetected = _read(data.eval_path, data.eval_split, "data.eval_path", cache_dir)
        efmt = CONVERSIONS[edetected][1] if edetected in CONVERSIONS else edetected
        if efmt != fmt:
            raise ValueError(
                f"data.eval_path: {esource} is in {efmt} format but data.train_path is in {fmt}; use one format"
            )
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
    notes = []
    if detected in CONVERSIONS:
        notes.append(f"data {data.name}: {CONVERSIONS[detected][2]}")
        log.info("%s", notes[-1])
    overlap = _overlap(train, evals)
    if overlap:
        where = (f"data.eval_path ({data.eval_path}) and data.train_path share rows" if data.eval_path is not None
                 else f"data.train_path ({source}) repeats rows, and data.eval_fraction split copies of them apart")
        notes.append(f"data {data.name}: {overlap} of {len(evals)} eval rows are also train rows (the same text): "
                     f"{where}; their eval loss measures memorisation, not generalisation: remove the duplicates "
                     "or give a separate data.eval_path")
        # once per process: a sweep's check of the data says it, its trials (in the same process) load it again
        log.log(logging.DEBUG if notes[-1] in _WARNED else logging.WARNING, "%s", notes[-1])
        _WARNED.add(notes[-1])
    return Splits(train=train, eval=evals, format=fmt, source=source, all_train=all_train, detected=detected,
                  overlap=overlap, notes=notes)


def check_train_size(splits: Splits, batch: Any, gpu: bool) -> None:
    """Refuse a train set smaller than one optimizer step's rows (``batch``: the ``batch`` group,
    :class:`sweeper.config.BatchConfig`): every step would repeat rows, and the plan's rows per step would
    not be what is trained. ``gpu``: the run gets a GPU, where batch=auto keeps its target effective batch
    (without one it trains its preset micro-batch x accumulation). The fix it names works either way."""
    n = len(splits.train)
    if batch.auto is not None:
        if gpu:
            effective, setting = int(batch.auto.target_effective_batch), "batch.auto.target_effective_batch"
        else:
            effective = int(batch.per_device_train_batch_size) * int(batch.gradient_accumulation_steps)
            setting = (f"batch=auto without a GPU trains its preset batch.per_device_train_batch_size="
                       f"{batch.per_device_train_batch_size} x batch.gradient_accumulation_steps="
                       f"{batch.gradient_accumulation_steps}")
        fix = (f"batch.auto.target_effective_batch={n} batch.per_device_train_batch_size={n} "
               "batch.gradient_accumulation_steps=1")
    else:
        effective = int(batch.per_device_train_batch_size) * int(batch.gradient_accumulation_steps)
        setting = (f"batch.per_device_train_batch_size={batch.per_device_train_batch_size} x "
                   f"batch.gradient_accumulation_steps={batch.gradient_accumulation_steps}")
        fix = f"batch.per_device_train_batch_size={n} batch.gradient_accumulation_steps=1"
    if n < effective:
        raise ValueError(
            f"data.train_path ({splits.source}): {n} train row(s), fewer than the effective batch of {effective} rows "
            f"per optimizer step ({setting}), so every step would repeat rows; add rows, or set {fix}")


def check_prepared(splits: Splits, data: DataConfig, train_rows: int, eval_rows: int,
                   prompt_tokens: Callable[[Any], list[int]] | None = None) -> None:
    """Raise one clear error when TRL's preparation (truncation at ``data.max_length``, which drops a row
    whose loss tokens are all cut) leaves no train row to learn from or no eval row to score: found
    before training, not at the first evaluation. ``prompt_tokens`` (rows -> the tokens before each row's first
    loss token) lets it name the data.max_length that keeps them."""
    where = {"train": f"data.train_path ({splits.source})",
             "eval": f"data.eval_path ({data.eval_path})" if data.eval_path is not None
             else f"the eval rows held out of data.train_path ({splits.source})"}
    for split, before, after in (("train", len(splits.train), train_rows), ("eval", len(splits.eval), eval_rows)):
        if before and not after:
            fix = "raise data.max_length"
            lengths = prompt_tokens(splits.train if split == "train" else splits.eval) if prompt_tokens else []
            if lengths:
                fix = (f"raise it to at least data.max_length={max(8, min(lengths) + 1)} (the shortest prompt is "
                       f"{min(lengths)} tokens; data.max_length={max(lengths) + 1} keeps every row)")
            raise ValueError(
                f"{where[split]}: 0 of {before} {split} rows keep a token to "
                f"{'learn from' if split == 'train' else 'score'} after truncation at data.max_length="
                f"{data.max_length} (the {'completion' if splits.format != 'messages' else 'assistant turn'} "
                f"starts beyond it); {fix}, or shorten the prompts")
