"""A user's own config folder beside the shipped groups: Hydra's ``--config-dir``.

    sft-sweep --config-dir ./conf -m schedule=under,sweet data=mydata   # ./conf/data/mydata.yaml
    sft-sweep plan --config-dir ./conf data=mydata
    sft-sweep cp data/jsonl conf/data/mydata.yaml                       # an editable starter copy

Hydra 1.3 searches its own configs, then the shipped ones (:data:`sweeper.paths.CONF_DIR`), then the
``--config-dir`` folder, and the first file found wins. So a user file with the name of a shipped one
(``conf/data/demo.yaml``, ``conf/config.yaml``) would be silently ignored: :func:`problem` refuses it
instead, with a missing folder, a folder without any ``.yaml`` file, and a file that is not valid YAML (in that
folder or in the shipped one, whose ``conf/local/`` is the user's too): one line naming the file, line and column,
where Hydra would print the parser's traceback. :func:`initialize` builds the same
search path for the commands that compose the config themselves (``plan``, ``report``), so they see the
user's groups exactly as the sweep does. Files of groups the project does not ship (``conf/local/``, a
new ``conf/data/mydata.yaml``) are simply added.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

from sweeper.paths import CONF_DIR
from sweeper.program import this_process

__all__ = ["copy_option", "initialize", "problem", "shipped_options", "syntax_problem"]


def _hydra_conf() -> Path:
    import hydra

    return Path(hydra.__file__).resolve().parent / "conf"


def syntax_problem(path: Path, shown: Path | str) -> str | None:
    """Why the YAML file ``path`` cannot be read (one line naming it as ``shown``, with the line and column, as
    OmegaConf's loader, which Hydra uses, reads it: a syntax error, a key given twice), or None."""
    import yaml
    from omegaconf._utils import get_yaml_loader

    try:
        yaml.load(path.read_text(encoding="utf-8"), Loader=get_yaml_loader())
    except UnicodeDecodeError as e:
        return f"{shown} is not UTF-8 text (byte 0x{e.object[e.start]:02x}); save it as UTF-8"
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is None:
            return f"{shown} is not valid YAML: {' '.join(str(e).split())}"
        context, where = getattr(e, "context", None), getattr(e, "context_mark", None)
        started = (f" ({context}{f' that starts at line {where.line + 1}, column {where.column + 1}' if where else ''})"
                   if context else "")
        return f"{shown} is not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {e.problem}{started}"
    return None


def _syntax_problems(folder: Path, shown: Path | str) -> str | None:
    """The first YAML file under ``folder`` that cannot be read (:func:`syntax_problem`), or None."""
    for p in sorted(folder.rglob("*.yaml")):
        why = p.is_file() and syntax_problem(p, Path(shown) / p.relative_to(folder))
        if why:
            return why
    return None


def problem(config_dir: str | None) -> str | None:
    """Why ``--config-dir config_dir`` cannot be used (one line), or None when it can (or is not given); also
    a file of the shipped configs that is not valid YAML (an edited ``conf/local/default.yaml``)."""
    why = _syntax_problems(CONF_DIR, CONF_DIR)
    if why or config_dir is None:
        return why
    folder = Path(config_dir).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        return (f"--config-dir {config_dir}: {folder.resolve()} {what}; pass the folder that holds your groups "
                f"(e.g. conf/ with conf/data/mydata.yaml, which `{this_process().prog} cp data/jsonl conf/data/mydata.yaml` writes)")
    files = sorted(p.relative_to(folder) for p in folder.rglob("*.yaml") if p.is_file())
    if not files:
        yml = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.yml"))
        hint = f" (Hydra reads .yaml only; rename {', '.join(yml[:3])})" if yml else ""
        return (f"--config-dir {config_dir}: no .yaml file in {folder.resolve()}{hint}; it should hold group "
                f"folders such as data/mydata.yaml (`{this_process().prog} cp data/jsonl {config_dir}/data/mydata.yaml` writes one)")
    hydra_conf = _hydra_conf()
    for rel in files:
        shown = Path(config_dir) / rel
        if rel == Path("config.yaml"):
            return (f"--config-dir {config_dir}: {shown} has the name of sft-sweep's primary config, which wins "
                    "over it (Hydra reads the shipped configs before --config-dir); put your settings in group files "
                    f"({config_dir}/data/mydata.yaml, picked with data=mydata) or in {config_dir}/local/default.yaml, "
                    "which the config reads last (per-machine settings such as hydra.sweeper.storage)")
        if (CONF_DIR / rel).is_file() or (hydra_conf / rel).is_file():
            group, option = "/".join(rel.parts[:-1]), rel.stem
            return (f"--config-dir {config_dir}: {shown} has the name of the shipped {group}={option}, which wins over "
                    f"it (Hydra reads the shipped configs before --config-dir); rename it, e.g. "
                    f"{shown.with_name(f'my_{option}.yaml')}, and pick it with {group}=my_{option}")
    why = _syntax_problems(folder, config_dir)
    return f"--config-dir {config_dir}: {why}" if why else None


@contextlib.contextmanager
def initialize(config_dir: str | None = None, job_name: str = "app") -> Iterator[None]:
    """``hydra.initialize_config_dir`` on the shipped configs, plus ``config_dir`` where Hydra's own
    ``--config-dir`` puts it; for ``hydra.compose``. Raises ValueError on a folder :func:`problem` refuses."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    why = problem(config_dir)
    if why:
        raise ValueError(why)
    version.setbase("1.3")
    search_path = create_config_search_path(str(CONF_DIR))
    if config_dir is not None:  # as hydra._internal.utils._run_hydra does for --config-dir
        search_path.prepend(provider="command-line", path=f"file://{Path(config_dir).expanduser().resolve()}",
                            anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2(task_name=job_name, config_search_path=search_path)
    try:
        yield
    finally:
        GlobalHydra.instance().clear()


def shipped_options() -> dict[str, list[str]]:
    """The shipped groups and their options (``{"data": ["banking77", ...], "hydra/sweeper": [...]}``)."""
    out: dict[str, list[str]] = {}
    for p in sorted(CONF_DIR.rglob("*.yaml")):
        rel = p.relative_to(CONF_DIR)
        if len(rel.parts) > 1 and rel.parts[0] != "local":
            out.setdefault("/".join(rel.parts[:-1]), []).append(rel.stem)
    return out


def copy_option(source: str, dest: str) -> str:
    """Copy the shipped option ``source`` (``group/option``, e.g. ``data/jsonl``) to the file ``dest``, comments
    kept, its top-level ``name:`` set to the new file's stem; return what to type to use it. Raises
    ValueError naming the problem (unknown option, ``dest`` taken or named like a shipped option)."""
    options = shipped_options()
    group, _, option = source.strip("/").removesuffix(".yaml").rpartition("/")
    if group not in options or option not in options[group]:
        listed = "; ".join(f"{g}/{{{','.join(o)}}}" for g, o in options.items() if g != "hydra/sweeper")
        return_hint = f"options of {group}: {', '.join(options[group])}" if group in options else f"shipped: {listed}"
        raise ValueError(f"cp {source}: no shipped option {source!r}; {return_hint}")
    target = Path(dest)
    if target.suffix != ".yaml":
        raise ValueError(f"cp {source} {dest}: the copy must end in .yaml (Hydra reads .yaml only), "
                         f"e.g. conf/{group}/my_{option}.yaml")
    if target.exists():
        raise ValueError(f"cp {source} {dest}: {dest} already exists; pick another name or remove it first")
    if target.stem in options[group] and target.parent.name == group.rpartition("/")[2]:
        raise ValueError(f"cp {source} {dest}: {target.stem} is the name of a shipped {group} option, which would "
                         f"win over your copy; pick another name, e.g. {target.with_name(f'my_{target.stem}.yaml')}")
    text = (CONF_DIR / group / f"{option}.yaml").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^name:[^#\n]*?(\s*#.*)?$", lambda m: f"name: {target.stem}{m.group(1) or ''}", text, count=1)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    root = target.parent.parent if target.parent.name == group.rpartition("/")[2] else None
    use = (f"{this_process().prog} --config-dir {root} -m {group}={target.stem} ..." if root is not None and "/" not in group
           else f"put it in <your conf>/{group}/ and pass --config-dir <your conf> {group}={target.stem}")
    return f"wrote {target} (a copy of {group}/{option}); edit it, then: {use}"
