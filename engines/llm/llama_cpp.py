"""llama.cpp's CPU kernels for a GGUF model, called through its C API with ctypes.

Why: decoding one token reads every weight once, so on a CPU its speed is the bytes read.
llama.cpp computes straight from the GGUF's 4-bit blocks (the bundled SmolLM2 is Q4_1, ~90 MB),
where the torch pass reads a half-precision copy three times that size: 15-19 ms per token on
one core of the development machine against 34-40 ms (docs/performance.md).

Where the library comes from: PyPI has no prebuilt llama-cpp-python (it compiles for minutes
and its default native build crashed here), but the ``gpt4all`` wheel ships a prebuilt llama.cpp
(its July 2024 C API) as ``libllamamodel-mainline-*.so``, exporting the ``llama_*`` functions.
This module binds the dozen it needs and checks, when loading, that the structures it passes
have the layout it expects (:func:`check_abi`); anything unexpected raises
:class:`LlamaCppUnavailable` and the caller falls back to the torch pass.

Tokens come from the model's Hugging Face tokenizer (the caller's), so prompts are the same
tokens as on the torch pass. The replies can differ after a while: llama.cpp multiplies the 4-bit
weights with 8-bit-rounded activations (of ten test questions, five gave transformers' 24
greedy tokens exactly, the others parted after 3 to 21). One llama.cpp context holds every
session's computed prompt as a *sequence* of its key/value cache (:class:`SeqCache`): a
session's prefix is shared with a new one by reference (``llama_kv_cache_seq_cp``), cut back with
``llama_kv_cache_seq_rm``.
Every call into the library happens on the caller's one worker thread; a cache dropped on
another thread only queues its sequence for release there.

llama.cpp cannot be interrupted inside a forward pass, so a prompt is computed in chunks of
:data:`CHUNK` tokens and the stop flag is checked between them (and between tokens).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from engines.llm import decoding
from engines.llm.decoding import StopFlag, Stopped

PACKAGE = "gpt4all"  # the wheel whose prebuilt llama.cpp is used
LIBRARY = "llmodel_DO_NOT_MODIFY/build/libllamamodel-mainline-{variant}.so"
CHUNK = 16  # prompt tokens per llama_decode call: a stop is seen within one chunk's time
# Work done ahead of a turn (the words so far) runs on one thread, so that the speech
# recogniser finding the turn's last words keeps the other core, in chunks small enough that
# the turn, when it comes, waits for one of them only (~35 ms here).
BACKGROUND_CHUNK = 4
KQ_MASK_PAD = 32  # llama.cpp's least batch size
CONTEXT_PER_SESSION = 2048  # key/value positions reserved per kept session
DEFAULT_SEED = 0xFFFFFFFF
# Pre-tokenizer names of newer GGUF files that this llama.cpp does not know, and the name of
# the same splitting rule it knows (of the same length: a copy of the file is patched).
PRE_TOKENIZER_ALIASES = {b"smollm": b"refact"}
_PRE_KEY = b"tokenizer.ggml.pre"
_GGUF_STRING = 8

_LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_LOG_ERROR = 2  # ggml_log_level: 2 error, 3 warning, 4 info


def _relay_log(level: int, text: bytes | None, _data: Any) -> None:
    """llama.cpp's own log: errors and warnings to ours, the chatter dropped."""
    if text and level <= _LOG_ERROR + 1:
        line = text.decode("utf-8", "replace").strip()
        if line:
            structlog.get_logger().warning("llama_cpp_log", text=line[:300])


_RELAY_LOG = _LOG(_relay_log)  # a constant: llama.cpp keeps the pointer


class LlamaCppUnavailable(RuntimeError):
    """No usable llama.cpp here (package missing, unexpected ABI, model refused)."""


class CacheFull(RuntimeError):
    """The context has no room left for the tokens (its sessions must be dropped)."""


class _Params(ctypes.Structure):
    """llama_model_params / llama_context_params, opaque: both are passed and returned in
    memory, so a buffer at least their size carries them; the fields set are checked first."""

    _fields_ = [("raw", ctypes.c_ubyte * 512)]


class _Batch(ctypes.Structure):
    """llama_batch (llama.h, 2024): what llama_batch_get_one fills in."""

    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)),
                ("embd", ctypes.c_void_p), ("pos", ctypes.c_void_p),
                ("n_seq_id", ctypes.c_void_p), ("seq_id", ctypes.c_void_p),
                ("logits", ctypes.c_void_p), ("all_pos_0", ctypes.c_int32),
                ("all_pos_1", ctypes.c_int32), ("all_seq_id", ctypes.c_int32)]


def library_path() -> Path | None:
    """The prebuilt llama.cpp of the ``gpt4all`` wheel for this CPU, or None."""
    spec = importlib.util.find_spec(PACKAGE)  # found, not imported: its import probes CUDA
    folders = list(spec.submodule_search_locations or []) if spec else []
    variant = "kompute" if _has_avx2() else "kompute-avxonly"
    for folder in folders:
        path = Path(folder) / LIBRARY.format(variant=variant)
        if path.is_file():
            return path
    return None


def _has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("\nflags", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags.split())


def load_library(path: Path) -> ctypes.CDLL:
    """Open ``path``, declare the functions used and check the ABI."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise LlamaCppUnavailable(f"cannot open {path}: {exc}") from exc
    p, i32, u32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "llama_log_set": (None, [_LOG, p]),
        "llama_backend_init": (None, []),
        "llama_model_default_params": (_Params, []),
        "llama_context_default_params": (_Params, []),
        "llama_load_model_from_file": (p, [ctypes.c_char_p, _Params]),
        "llama_new_context_with_model": (p, [p, _Params]),
        "llama_free": (None, [p]),
        "llama_free_model": (None, [p]),
        "llama_n_vocab": (i32, [p]),
        "llama_set_n_threads": (None, [p, u32, u32]),
        "llama_batch_get_one": (_Batch, [ctypes.POINTER(i32), i32, i32, i32]),
        "llama_decode": (i32, [p, _Batch]),
        "llama_get_logits": (ctypes.POINTER(ctypes.c_float), [p]),
        "llama_kv_cache_seq_rm": (ctypes.c_bool, [p, i32, i32, i32]),
        "llama_kv_cache_seq_cp": (None, [p, i32, i32, i32, i32]),
    }
    for name, (restype, argtypes) in signatures.items():
        try:
            function = getattr(lib, name)
        except AttributeError as exc:
            raise LlamaCppUnavailable(f"{path.name} has no {name}") from exc
        function.restype, function.argtypes = restype, argtypes
    check_abi(lib)
    lib.llama_log_set(_RELAY_LOG, None)
    lib.llama_backend_init()
    return lib


def check_abi(lib: ctypes.CDLL) -> None:
    """Refuse a llama.cpp whose structures differ from those this module writes."""
    params = lib.llama_context_default_params()
    head = list((ctypes.c_uint32 * 5).from_buffer_copy(params.raw))
    if head != [DEFAULT_SEED, 512, 2048, 512, 1]:
        raise LlamaCppUnavailable(f"unexpected llama_context_params defaults {head}")
    tokens = (ctypes.c_int32 * 3)(1, 2, 3)
    batch = lib.llama_batch_get_one(tokens, 3, 7, 5)
    seen = (batch.n_tokens, batch.token[2], batch.all_pos_0, batch.all_pos_1, batch.all_seq_id)
    if seen != (3, 3, 7, 1, 5) or batch.pos or batch.logits:
        raise LlamaCppUnavailable(f"unexpected llama_batch layout {seen}")


def loadable_gguf(gguf: Path, cache_dir: Path) -> Path:
    """``gguf``, or a copy in ``cache_dir`` whose pre-tokenizer name this llama.cpp knows.

    The name only selects how llama.cpp's own tokenizer splits text, which is not used here
    (the Hugging Face tokenizer makes the tokens), but an unknown name refuses the file.
    """
    with gguf.open("rb") as f:
        head = f.read(1 << 20)  # the metadata comes first; the tokenizer name early in it
    at = head.find(_PRE_KEY)
    if at < 0:
        return gguf
    value_at = at + len(_PRE_KEY)
    kind = int.from_bytes(head[value_at:value_at + 4], "little")
    length = int.from_bytes(head[value_at + 4:value_at + 12], "little")
    name = head[value_at + 12:value_at + 12 + length]
    alias = PRE_TOKENIZER_ALIASES.get(name)
    if kind != _GGUF_STRING or alias is None:
        return gguf
    target = cache_dir / f"{gguf.stem}.{alias.decode()}.gguf"
    if target.is_file() and target.stat().st_size == gguf.stat().st_size:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    data = bytearray(gguf.read_bytes())
    data[value_at + 12:value_at + 12 + length] = alias
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    partial.write_bytes(data)
    partial.replace(target)  # atomic: a concurrent start never reads half a file
    return target


class SeqCache:
    """One sequence of the context's key/value cache: the computed positions of ``ids``."""

    __slots__ = ("__weakref__", "_owner", "ids", "seq")

    def __init__(self, owner: LlamaCpp, seq: int, ids: list[int] | None = None) -> None:
        self._owner = owner
        self.seq = seq
        self.ids = ids or []
        weakref.finalize(self, owner._released.append, seq)

    def truncate(self, length: int) -> None:
        if length < len(self.ids):
            self._owner._lib.llama_kv_cache_seq_rm(self._owner._ctx, self.seq, length, -1)
            del self.ids[length:]

    def copy_prefix(self, length: int) -> SeqCache:
        out = self._owner.new_cache()
        self._owner._lib.llama_kv_cache_seq_cp(self._owner._ctx, self.seq, out.seq, 0, length)
        out.ids = list(self.ids[:length])
        return out

    def load_prefix(self, other: SeqCache, length: int) -> None:
        lib, ctx = self._owner._lib, self._owner._ctx
        lib.llama_kv_cache_seq_rm(ctx, self.seq, 0, -1)
        lib.llama_kv_cache_seq_cp(ctx, other.seq, self.seq, 0, length)
        self.ids = list(other.ids[:length])

    @property
    def nbytes(self) -> int:
        return len(self.ids) * self._owner.bytes_per_position


class LlamaCpp:
    """A GGUF model and one context on llama.cpp: forward passes and greedy decoding."""

    def __init__(self, gguf: Path, *, sessions: int, threads: int = 1, batch_threads: int = 2,
                 context: int | None = None, bytes_per_position: int = 0,
                 library: Path | None = None) -> None:
        path = library or library_path()
        if path is None:
            raise LlamaCppUnavailable(f"no prebuilt llama.cpp: install the {PACKAGE} package")
        self._lib = load_library(path)
        self.library = path
        self.threads = max(1, threads)
        self.batch_threads = max(self.threads, batch_threads)
        self._model = self._lib.llama_load_model_from_file(
            str(gguf).encode(), self._lib.llama_model_default_params())
        if not self._model:
            raise LlamaCppUnavailable(f"llama.cpp refused {gguf} (see llama_cpp_log)")
        self.sequences = sessions + 4  # kept sessions, the shared prefix, one unkept, spares
        params = self._lib.llama_context_default_params()
        fields = (ctypes.c_uint32 * 7).from_buffer(params.raw)
        fields[1] = context or CONTEXT_PER_SESSION * (sessions + 2)  # n_ctx
        fields[2] = fields[3] = max(CHUNK, KQ_MASK_PAD)  # n_batch, n_ubatch
        fields[4] = self.sequences  # n_seq_max
        fields[5], fields[6] = self.threads, self.batch_threads
        self.context_size = int(fields[1])
        self._ctx = self._lib.llama_new_context_with_model(self._model, params)
        if not self._ctx:
            self._lib.llama_free_model(self._model)
            raise LlamaCppUnavailable("llama.cpp could not create a context (memory?)")
        self.vocab = int(self._lib.llama_n_vocab(self._model))
        self.bytes_per_position = bytes_per_position  # of the KV cache (for memory figures)
        self._free = deque(range(self.sequences))
        self._released: deque[int] = deque()  # sequences of caches dropped, to clear here
        self._closed = threading.Event()

    # -- sequences

    def new_cache(self) -> SeqCache:
        self._reclaim()
        if not self._free:
            raise CacheFull("every key/value sequence is in use")
        return SeqCache(self, self._free.popleft())

    def _reclaim(self) -> None:
        while self._released:
            seq = self._released.popleft()
            self._lib.llama_kv_cache_seq_rm(self._ctx, seq, 0, -1)
            self._free.append(seq)

    # -- forward

    def forward(self, ids: list[int], cache: SeqCache, stop: StopFlag | None = None,
                background: bool = False) -> np.ndarray:
        """Append ``ids`` to ``cache``; the logits (float32) after the last of them.

        Several tokens at once are computed on ``batch_threads``, one on ``threads``;
        ``background`` work on ``threads`` only, :data:`BACKGROUND_CHUNK` tokens at a time.
        """
        if self._closed.is_set():
            raise Stopped
        self._reclaim()
        if not background:
            return self._forward(ids, cache, stop, CHUNK)
        self._lib.llama_set_n_threads(self._ctx, self.threads, self.threads)
        try:
            return self._forward(ids, cache, stop, BACKGROUND_CHUNK)
        finally:
            self._lib.llama_set_n_threads(self._ctx, self.threads, self.batch_threads)

    def _forward(self, ids: list[int], cache: SeqCache, stop: StopFlag | None,
                 size: int) -> np.ndarray:
        logits = None
        for start in range(0, len(ids), size):
            if stop is not None and stop.is_set():
                raise Stopped
            chunk = ids[start:start + size]
            tokens = (ctypes.c_int32 * len(chunk))(*chunk)
            batch = self._lib.llama_batch_get_one(tokens, len(chunk), len(cache.ids), cache.seq)
            status = self._lib.llama_decode(self._ctx, batch)
            if status == 1:
                raise CacheFull(f"no room for {len(chunk)} positions in the context "
                                f"({self.context_size})")
            if status != 0:
                raise RuntimeError(f"llama_decode failed ({status})")
            cache.ids.extend(chunk)
            logits = self._lib.llama_get_logits(self._ctx)
        assert logits is not None, "nothing to run"
        return np.ctypeslib.as_array(logits, shape=(self.vocab,)).copy()

    def pick(self, logits: np.ndarray, seen: set[int], repetition_penalty: float) -> int:
        if repetition_penalty != 1.0 and seen:
            index = np.fromiter(seen, dtype=np.int64, count=len(seen))
            score = logits[index]
            logits[index] = np.where(score < 0, score * repetition_penalty,
                                     score / repetition_penalty)
        return int(np.argmax(logits))

    def greedy(self, prompt: list[int], cache: SeqCache, max_new_tokens: int,
               eos: set[int], repetition_penalty: float = 1.0,
               stop: StopFlag | None = None, last: np.ndarray | None = None) -> Iterator[int]:
        """New tokens after ``prompt`` (see :func:`engines.llm.decoding.greedy`)."""
        return decoding.greedy(self, prompt, cache, max_new_tokens, eos, repetition_penalty,
                               stop, last)

    def close(self) -> None:
        """Free the context and the model (on the thread that runs the forward passes)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._lib.llama_free(self._ctx)
        self._lib.llama_free_model(self._model)
