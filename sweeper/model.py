"""Model and tokenizer loading (``model`` and ``precision`` config groups).

``model.path=tiny`` builds a small Qwen2-architecture model from a config (random init) and a
byte-level BPE tokenizer trained offline on the demo corpus, with a ChatML template that marks
assistant turns with ``{% generation %}`` (so TRL's assistant-only loss works). It is written once
to ``<cache_dir>/models/tiny-<hash>/`` and then loaded like any local model, so the tiny path and
a real model share one code path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

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


def _tiny_dir(tiny_cfg: Any, cache_dir: Path) -> Path:
    spec = {k: tiny_cfg[k] for k in sorted(tiny_cfg.keys())}
    spec["template"] = CHATML_TEMPLATE
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir / "models" / f"tiny-{digest}"


def build_tiny(tiny_cfg: Any, cache_dir: str | Path) -> Path:
    """Build (once) and return the directory of the tiny model + tokenizer."""
    out = _tiny_dir(tiny_cfg, Path(cache_dir))
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
        vocab_size=int(tiny_cfg.vocab_size),
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(demo_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=int(tiny_cfg.max_position_embeddings),
    )
    tok.chat_template = CHATML_TEMPLATE

    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=int(tiny_cfg.hidden_size),
        intermediate_size=int(tiny_cfg.intermediate_size),
        num_hidden_layers=int(tiny_cfg.num_hidden_layers),
        num_attention_heads=int(tiny_cfg.num_attention_heads),
        num_key_value_heads=int(tiny_cfg.num_key_value_heads),
        max_position_embeddings=int(tiny_cfg.max_position_embeddings),
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(int(tiny_cfg.seed))
    model = Qwen2ForCausalLM(config)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: another worker may have built it meanwhile
    except OSError:
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


def resolve_path(model_cfg: Any, cache_dir: str | Path) -> str:
    """A loadable path or hub id; builds the tiny model first when ``model.path=tiny``."""
    if model_cfg.path == "tiny":
        if model_cfg.tiny is None:
            raise ValueError("model.path=tiny needs a model.tiny section; pick model=tiny")
        return str(build_tiny(model_cfg.tiny, cache_dir))
    return str(model_cfg.path)


def load_tokenizer(model_cfg: Any, cache_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    path = resolve_path(model_cfg, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(model_cfg.trust_remote_code))
    except OSError as e:
        raise ValueError(
            f"model.path={model_cfg.path!r}: its tokenizer could not be loaded ({e}); give a local directory, "
            "a reachable hub id, or pick model=tiny"
        ) from e
    if tokenizer.chat_template is None:
        raise ValueError(
            f"model.path={model_cfg.path!r}: the tokenizer has no chat template, which TRL needs for "
            "'messages' data; use an instruct/chat model or set one in its tokenizer_config.json"
        )
    return tokenizer


def model_shape(model_cfg: Any, cache_dir: str | Path) -> dict | None:
    """The model's architecture as a Hugging Face config dict, without loading weights: config.json
    of a local/tiny model, else ``model.shape``, else the hub (None when none of them answers)."""
    path = Path(resolve_path(model_cfg, cache_dir))
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if model_cfg.shape is not None:
        return {k: model_cfg.shape[k] for k in model_cfg.shape}
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(model_cfg.path)).to_dict()
    except Exception:
        return None


def load(model_cfg: Any, precision_cfg: Any, cache_dir: str | Path,
         attn_implementation: str | None = None) -> tuple[Any, Any, str]:
    """Return ``(model, tokenizer, compute)`` where compute is the resolved precision name.
    ``attn_implementation`` applies when ``model.attn_implementation`` is not set."""
    from transformers import AutoModelForCausalLM

    compute = resolve_compute(precision_cfg.compute)
    weights = compute if model_cfg.dtype == "auto" else model_cfg.dtype
    if weights == "fp16":
        # fp16 master weights cannot be trained with the AMP grad scaler; keep fp32 masters.
        weights = "fp32"
    path = resolve_path(model_cfg, cache_dir)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(weights), "trust_remote_code": bool(model_cfg.trust_remote_code)}
    if model_cfg.attn_implementation or attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation or attn_implementation
    if precision_cfg.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f"precision={precision_cfg.name} needs bitsandbytes: pip install -e '.[qlora]'"
            ) from e
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=precision_cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=bool(precision_cfg.bnb_4bit_use_double_quant),
            bnb_4bit_compute_dtype=torch_dtype(compute),
        )
    tokenizer = load_tokenizer(model_cfg, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ValueError(
            f"model.path={model_cfg.path!r} could not be loaded ({e}); give a local directory with "
            "config.json and weights, a reachable hub id, or pick model=tiny"
        ) from e
    return model, tokenizer, compute
