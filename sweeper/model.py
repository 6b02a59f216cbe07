"""Model and tokenizer loading: every function takes the ``model`` (and ``precision``) config group as its
schema dataclass (:class:`sweeper.config.ModelConfig`, :class:`sweeper.config.PrecisionConfig`).

``model.path=tiny`` builds a small Qwen2-architecture model from a config (random init) and a
byte-level BPE tokenizer trained offline on the demo corpus, with a ChatML template that marks
assistant turns with ``{% generation %}`` (so TRL's assistant-only loss works). It is written once
to ``<cache_dir>/models/tiny-<hash>/`` and then loaded like any local model, so the tiny path and
a real model share one code path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sweeper.config import ModelConfig, PrecisionConfig, TinyModelConfig

__all__ = ["AHEAD_MOST_SHARE", "CHATML_TEMPLATE", "build_tiny", "check_path", "host_available_bytes", "load",
           "load_tokenizer", "model_shape", "read_ahead", "resolve_compute", "resolve_path", "took_ahead",
           "torch_dtype"]

log = logging.getLogger(__name__)

# ChatML, the format of Qwen2.5 chat models, minus the default system prompt. The assistant's
# end-of-turn token sits inside the generation block so the model learns to stop.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _fields(group: Any) -> dict:
    """A config group's keys and values, whether a schema dataclass or a config node."""
    return asdict(group) if is_dataclass(group) else {k: group[k] for k in group}


def _tiny_dir(tiny: TinyModelConfig, cache_dir: Path) -> Path:
    spec = dict(sorted(_fields(tiny).items()))
    spec["template"] = CHATML_TEMPLATE
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir / "models" / f"tiny-{digest}"


def build_tiny(tiny: TinyModelConfig, cache_dir: str | Path) -> Path:
    """Build (once) and return the directory of the tiny model + tokenizer."""
    out = _tiny_dir(tiny, Path(cache_dir))
    if (out / "config.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from sweeper.data import demo_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(tiny.vocab_size),
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(demo_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=int(tiny.max_position_embeddings),
    )
    tok.chat_template = CHATML_TEMPLATE

    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=int(tiny.hidden_size),
        intermediate_size=int(tiny.intermediate_size),
        num_hidden_layers=int(tiny.num_hidden_layers),
        num_attention_heads=int(tiny.num_attention_heads),
        num_key_value_heads=int(tiny.num_key_value_heads),
        max_position_embeddings=int(tiny.max_position_embeddings),
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(int(tiny.seed))
    model = Qwen2ForCausalLM(config)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)  # atomic: another worker may have built it meanwhile
        except OSError:
            pass  # another worker's copy is in place
    finally:  # also after a Ctrl-C or a full disk mid-save: no half-written folder left beside the cache
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(p.numel() for p in model.parameters())
    log.info("built tiny model (%d parameters, vocab %d) in %s", n, len(tok), out)
    return out


def resolve_compute(name: str) -> str:
    """``auto`` -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def torch_dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def resolve_path(model: ModelConfig, cache_dir: str | Path) -> str:
    """A loadable path or hub id; builds the tiny model first when ``model.path=tiny``."""
    if model.path == "tiny":
        if model.tiny is None:
            raise ValueError("model.path=tiny needs a model.tiny section; pick model=tiny")
        return str(build_tiny(model.tiny, cache_dir))
    return str(model.path)


# the files whose presence says a folder holds transformers weights (one file, or the index of its shards)
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_SAVED = ("point model.path at a folder written by save_pretrained (config.json, the weights and the tokenizer), "
          "or give a hub id such as Qwen/Qwen2.5-0.5B-Instruct")


def _is_local(path: str) -> bool:
    """Whether ``model.path`` names a folder on this machine rather than a hub id (owner/name)."""
    return Path(path).expanduser().exists() or path.startswith(("/", ".", "~")) or path.count("/") > 1


def check_path(model: ModelConfig) -> None:
    """Refuse, in one ValueError line naming ``model.path``, a local path that cannot hold a model: one that does
    not exist, a file, or a folder without ``config.json`` or without weights. Reads no file and imports nothing
    (a hub id, or a PEFT adapter folder, is left to the loader)."""
    path = str(model.path)
    if path == "tiny" or not _is_local(path):
        return
    local = Path(path).expanduser().absolute()
    if not local.exists():
        raise ValueError(f"model.path={path!r}: no such folder ({local}); {_SAVED}")
    if not local.is_dir():
        raise ValueError(f"model.path={path!r}: {local} is a file, not a model folder; {_SAVED}")
    if (local / "adapter_config.json").is_file():
        return
    if not (local / "config.json").is_file():
        raise ValueError(f"model.path={path!r}: {local} holds no config.json, so no saved model; {_SAVED}")
    if not any((local / w).is_file() for w in _WEIGHTS) and not any(local.glob("*.safetensors")):
        raise ValueError(f"model.path={path!r}: {local} holds a config.json but no weights ({', '.join(_WEIGHTS[::2])} "
                         f"or their shards); {_SAVED}")


HUB_PROBE_TIMEOUT_S = 3.0  # one request to the hub before any download; huggingface_hub itself retries ~55 s


@functools.lru_cache(maxsize=None)
def _hub_unreachable(endpoint: str, offline: bool) -> str | None:
    """None when ``endpoint`` (the Hugging Face hub) answers one request within HUB_PROBE_TIMEOUT_S
    seconds, else why not. One try and no retries, unlike huggingface_hub, which retries a failed
    request five times with back-off (about a minute offline). Cached per endpoint for the process."""
    if offline:
        return "HF_HUB_OFFLINE=1"
    from huggingface_hub.utils import get_session

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)  # any HTTP answer means reachable
            outcome.append(None)
        except Exception as e:  # connection refused, DNS failure, timeout, proxy error, ...
            outcome.append(f"{type(e).__name__}: {e}")

    # a thread bounds the wait also where name resolution itself hangs (it ignores the HTTP timeout)
    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    return outcome[0] if outcome else f"no answer within {HUB_PROBE_TIMEOUT_S:g} s"


def _from_pretrained(loader: Any, path: str, what: str, model: ModelConfig, **kwargs: Any) -> Any:
    """``loader.from_pretrained(path)`` from local files first (a directory or the Hugging Face cache:
    never the network); then, for a hub id, from the hub, but only after one short request shows it
    is reachable. Raises one-line ValueErrors that name ``model.path`` and what to do."""
    try:
        return loader.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as local_error:  # ValueError: a directory without tokenizer files, a bad id
        check_path(model)  # a local path: no such folder, a file, no saved model in it, said as such
        local = Path(path).expanduser().absolute()
        if local.is_dir():
            raise ValueError(f"model.path={model.path!r}: the {what} could not be loaded from the local "
                             f"directory {local} ({_one_line(local_error)}); point model.path at a directory "
                             "saved with save_pretrained, or give a hub id") from local_error
        from huggingface_hub import constants

        offline = constants.is_offline_mode()
        why = _hub_unreachable(constants.ENDPOINT, offline)
        if why is not None:
            hub = "the hub is switched off (HF_HUB_OFFLINE=1)" if offline else \
                f"the hub ({constants.ENDPOINT}) cannot be reached ({why})"
            raise ValueError(
                f"model.path={model.path!r}: the {what} could not be loaded offline: it is not in the Hugging "
                f"Face cache ({constants.HF_HUB_CACHE}) and {hub}; download it where the hub is reachable "
                f"(hf download {path}) into that cache, point model.path at a local copy, or pick model=tiny"
                + ("" if offline else "; HF_HUB_OFFLINE=1 skips this check")) from local_error
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ValueError(
            f"model.path={model.path!r}: the {what} could not be loaded ({_one_line(e)}); give a local "
            "directory, a reachable hub id, or pick model=tiny"
        ) from e


def _one_line(e: Exception, most: int = 200) -> str:
    """A library's (often multi-line) message as one line of at most ``most`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= most else text[:most - 1] + "…"


def load_tokenizer(model: ModelConfig, cache_dir: str | Path) -> Any:
    """The model's tokenizer: local files (directory or Hugging Face cache) first, the hub only when it
    answers (see :func:`_from_pretrained`); offline and not cached, one ValueError within seconds."""
    from transformers import AutoTokenizer

    path = resolve_path(model, cache_dir)
    tokenizer = _from_pretrained(AutoTokenizer, path, "tokenizer", model,
                                 trust_remote_code=bool(model.trust_remote_code))
    if tokenizer.chat_template is None:
        raise ValueError(
            f"model.path={model.path!r}: the tokenizer has no chat template, which TRL needs for "
            "'messages' data; use an instruct/chat model or set one in its tokenizer_config.json"
        )
    return tokenizer


def model_shape(model: ModelConfig, cache_dir: str | Path) -> dict | None:
    """The model's architecture as a Hugging Face config dict, without loading weights: config.json
    of a local/tiny model, else ``model.shape``, else the Hugging Face cache, else the hub when it
    answers within seconds (None when none of them has it)."""
    path = Path(resolve_path(model, cache_dir))
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if model.shape is not None:
        return _fields(model.shape)
    try:
        from transformers import AutoConfig

        return _from_pretrained(AutoConfig, str(model.path), "config", model,
                                trust_remote_code=bool(model.trust_remote_code)).to_dict()
    except Exception:
        return None


def _load_args(model: ModelConfig, compute: str, cache_dir: str | Path,
               attn_implementation: str | None) -> tuple[str, dict[str, Any]]:
    """The path and the ``from_pretrained`` arguments of an unquantised load (the 4-bit one adds its own)."""
    weights = compute if model.dtype == "auto" else model.dtype
    if weights == "fp16":
        # fp16 master weights cannot be trained with the AMP grad scaler; keep fp32 masters.
        weights = "fp32"
    kwargs: dict[str, Any] = {"dtype": torch_dtype(weights), "trust_remote_code": bool(model.trust_remote_code)}
    if model.attn_implementation or attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation or attn_implementation
    return resolve_path(model, cache_dir), kwargs


class _Ahead:
    """Weights read in a thread of their own (:func:`read_ahead`) for this process's next :func:`load`."""

    def __init__(self, key: str, path: str, kwargs: dict[str, Any]) -> None:
        self.key, self.model, self.seconds = key, None, None
        self.done = threading.Event()
        # not a daemon: a command that ends (a refusal, Ctrl-C) while the weights are read waits for the read, as
        # torch's teardown under a thread still inside it aborts the process ("terminate called ...", exit 134)
        threading.Thread(target=self._read, args=(path, kwargs), name="sweeper-read-ahead").start()

    def _read(self, path: str, kwargs: dict[str, Any]) -> None:
        import time

        from transformers import AutoModelForCausalLM

        t = time.perf_counter()
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            self.seconds = time.perf_counter() - t
        except BaseException as e:  # the trial's own load reads it again and reports what is wrong
            log.debug("reading the model ahead failed: %s", e)
        finally:
            self.done.set()

    def take(self) -> Any:
        """The weights once read (None if the read failed); this object keeps no reference to them."""
        self.done.wait()
        model, self.model = self.model, None
        return model


_ahead: dict[str, Any] = {}  # "next": the _Ahead of read_ahead; "took": the seconds of the weights the last load took


def _key(path: str, kwargs: dict[str, Any]) -> str:
    return repr((path, sorted(kwargs.items(), key=str)))


def host_available_bytes() -> int | None:
    """The memory the kernel says this host can give a process without swapping (``MemAvailable`` of
    ``/proc/meminfo``: free memory plus what the page cache can give back); None where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _weights_bytes(model: ModelConfig, cache_dir: str | Path, dtype: Any) -> int | None:
    """The bytes of the model's weights once loaded in ``dtype``: its parameters counted from its config (a
    Llama/Qwen2-style decoder), else None."""
    from sweeper.memory import count_params

    try:
        shape = model_shape(model, cache_dir)
        return None if shape is None else count_params(shape) * dtype.itemsize
    except ValueError:  # a config of another shape: not counted
        return None


# at most this share of the host's available memory is read ahead (the data check's child tokenises meanwhile)
AHEAD_MOST_SHARE = 0.5


def read_ahead(model: ModelConfig, precision: PrecisionConfig, cache_dir: str | Path, compute: str,
               attn_implementation: str | None = None) -> None:
    """Start reading the model's weights into host memory in a thread, for this process's next :func:`load` (a
    sweep's command starts it while it waits for its data check, so that its first trial starts training that
    much sooner): that load takes them when it asks for the same weights (path, dtype, attention), waiting for
    the read to end if need be, else waits for it and drops them (one copy in memory at a time). Never touches
    CUDA (the weights stay on the CPU, as ``from_pretrained`` leaves them); a 4-bit base (quantised as it loads,
    on the GPU) and a model of remote code are not read ahead; a failure is left to the trial's own load, which
    reports it. Weights of unknown size, or larger than :data:`AHEAD_MOST_SHARE` of the host's available memory,
    are not read ahead either (the data check's child tokenises meanwhile; the trial reads them once it is done). A
    process that ends while the weights are read (a refusal, Ctrl-C) waits for the read first."""
    if precision.load_in_4bit or model.trust_remote_code or "next" in _ahead:
        return
    try:
        import transformers
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        path, kwargs = _load_args(model, compute, cache_dir, attn_implementation)
        need, available = _weights_bytes(model, cache_dir, kwargs["dtype"]), host_available_bytes()
        if need is None or available is None or need > AHEAD_MOST_SHARE * available:
            log.info("model not read ahead: its weights (%s) are not known to fit in %.0f%% of this host's available "
                     "memory (%s); its first trial reads them itself", _gib(need), 100 * AHEAD_MOST_SHARE,
                     _gib(available))
            return
        # the model's class imported here, not in the thread: one thread imports at a time
        MODEL_FOR_CAUSAL_LM_MAPPING[type(_from_pretrained(AutoConfig, path, "config", model))]
        transformers.utils.logging.disable_progress_bar()  # the command's console keeps its own lines
    except Exception as e:
        log.debug("no model read ahead: %s", e)
        return
    _ahead["next"] = _Ahead(_key(path, kwargs), path, kwargs)


def _gib(n: int | None) -> str:
    return "unknown size" if n is None else f"{n / 2**30:.1f} GiB"


def took_ahead() -> float | None:
    """The seconds :func:`read_ahead` spent reading the weights the last :func:`load` took; None when that load
    read them itself."""
    return _ahead.get("took")


def load(model: ModelConfig, precision: PrecisionConfig, cache_dir: str | Path,
         attn_implementation: str | None = None) -> tuple[Any, Any, str]:
    """Return ``(model, tokenizer, compute)`` where compute is the resolved precision name.
    ``attn_implementation`` applies when ``model.attn_implementation`` is not set. Weights that
    :func:`read_ahead` read for the same arguments are taken instead of read again."""
    from transformers import AutoModelForCausalLM

    compute = resolve_compute(precision.compute)
    path, kwargs = _load_args(model, compute, cache_dir, attn_implementation)
    _ahead.pop("took", None)
    ahead = _ahead.pop("next", None)  # used once: weights asked for differently are dropped here
    if ahead is not None:
        taken = ahead.take()
        if taken is not None and not precision.load_in_4bit and ahead.key == _key(path, kwargs):
            _ahead["took"] = ahead.seconds
            return taken, load_tokenizer(model, cache_dir), compute
        del taken
    if precision.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f"precision={precision.name} needs bitsandbytes: pip install -e '.[qlora]'"
            ) from e
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=precision.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=bool(precision.bnb_4bit_use_double_quant),
            bnb_4bit_compute_dtype=torch_dtype(compute),
        )
    tokenizer = load_tokenizer(model, cache_dir)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ValueError(
            f"model.path={model.path!r} could not be loaded ({e}); give a local directory with "
            "config.json and weights, a reachable hub id, or pick model=tiny"
        ) from e
    return loaded, tokenizer, compute
