"""Every setting of the system, in one place: a CLI flag with an environment-variable fallback.

Each process (supervisor, broker, actor, tap) builds its parser from the groups it needs, so one
flag means the same thing everywhere. The supervisor resolves all groups and hands the values to
its children through the environment, which is why every option has an environment variable.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "PARLEY_"


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: ``--flag`` on the command line, ``PARLEY_FLAG`` in the environment."""

    flag: str
    default: Any
    help: str
    type: type = str
    choices: tuple[str, ...] | None = None
    env: str | None = None  # overrides the derived PARLEY_* name (e.g. OPENAI_API_KEY)
    secret: bool = False  # never printed in --help defaults or logs

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env_name(self) -> str:
        return self.env or ENV_PREFIX + self.dest.upper()


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false), got {text!r}")


GROUPS: dict[str, tuple[Option, ...]] = {
    "bus": (
        Option("--bus-pub", "tcp://127.0.0.1:7701",
               "broker endpoint that publishers connect to (its XSUB side)"),
        Option("--bus-sub", "tcp://127.0.0.1:7702",
               "broker endpoint that subscribers connect to (its XPUB side)"),
        Option("--bus-keys", "",
               "folder of CURVE keys (python -m bus.keys); required when the bus is not on loopback"),
        Option("--instance", "", "this process's name on the bus; empty: ACTOR-<random>"),
    ),
    "log": (
        Option("--log-json", False, "log JSON lines instead of readable text", type=_bool),
        Option("--log-level", "info", "log level", choices=("debug", "info", "warning", "error")),
    ),
    "signaling": (
        Option("--host", "127.0.0.1", "address the call page is served on"),
        Option("--port", 8080, "port the call page is served on", type=int),
        Option("--https", False, "serve HTTPS (always on when --host is not loopback)", type=_bool),
        Option("--cert", "", "TLS certificate (PEM); self-signed one made in --cert-dir if empty"),
        Option("--key", "", "TLS private key (PEM) for --cert"),
        Option("--cert-dir", ".certs", "where a generated self-signed certificate is kept"),
    ),
    "ice": (
        Option("--ice-servers", "",
               "comma-separated STUN/TURN URLs (turn:user:pass@host:port), used by the server "
               "and handed to the page; empty on loopback"),
    ),
    "media": (
        Option("--ice-loopback", True,
               "offer 127.0.0.1 as an ICE candidate (needed for calls on this machine)", type=_bool),
        Option("--turn-mode", "vad", "how a user's turn ends by default", choices=("vad", "ptt")),
        Option("--vad-threshold", 0.5, "speech probability that counts as speech", type=float),
        Option("--vad-silence-ms", 500, "silence that ends a turn in hands-free mode", type=int),
        Option("--vad-early-ms", 120,
               "silence after which a hands-free turn is answered speculatively, played only "
               "once --vad-silence-ms confirms it (0: off)", type=int),
        Option("--vad-pause-ms", 32,
               "silence after which the words so far are transcribed at once, in case the turn "
               "ends in this pause: the early end then finds them found or on the way (0: off)",
               type=int),
        Option("--vad-quiet-db", 30.0,
               "a chunk (or its second half) this many dB below the take's speech is a pause "
               "for --vad-pause-ms even while the VAD, which lags the sound by ~60 ms, still "
               "hears speech "
               "(0: the VAD alone)", type=float),
        Option("--partial-ms", 600,
               "while the user speaks, the words so far are transcribed this often: a live "
               "caption, and a local LLM computes them before the turn ends (0: off)", type=int),
        Option("--min-speech-ms", 250,
               "speech needed before it counts (barge-in and utterance)", type=int),
        Option("--max-utterance-s", 30.0, "longest utterance; longer speech is cut", type=float),
        Option("--media-nice", -10,
               "CPU priority (nice) the media actor asks for, so its 20 ms clock beats model "
               "inference; needs root or CAP_SYS_NICE below 0", type=int),
    ),
    "asr": (
        Option("--asr-backend", "faster-whisper", "speech recognition backend",
               choices=("faster-whisper", "transformers")),
        Option("--asr-model", "tiny.en",
               "bundled name (tiny.en, base), local folder, or Hugging Face id"),
        Option("--asr-device", "auto", "cpu, cuda or auto"),
        Option("--asr-language", "en", "spoken language code, or empty to detect"),
        Option("--asr-min-speech-ms", 300,
               "speech (by VAD) an utterance needs to be transcribed at all", type=int),
        Option("--asr-cache-dir", "cache", "where the two-part bundled Whisper base is joined"),
        Option("--asr-threads", 0, "CPU threads of faster-whisper (0: the cores available, up to 8)",
               type=int),
    ),
    "llm": (
        Option("--llm-backend", "auto",
               "auto: openai when a base URL or key is set, else local",
               choices=("auto", "openai", "local")),
        Option("--llm-base-url", "", "OpenAI-compatible endpoint (vLLM, llama.cpp, Ollama, OpenAI)"),
        Option("--llm-api-key", "", "API key for --llm-base-url", env="OPENAI_API_KEY", secret=True),
        Option("--llm-model", "",
               "model name (openai), or Hugging Face id/folder or .gguf file (local); "
               "empty: the default"),
        Option("--llm-device", "auto", "cpu, cuda or auto (local backend)"),
        Option("--llm-engine", "auto",
               "runtime of a local model: llama.cpp (a .gguf on the CPU), torch (the lean pass "
               "for Llama models), transformers (generate), or auto: the first that applies",
               choices=("auto", "llama.cpp", "torch", "transformers")),
        Option("--llm-system-prompt", "", "system prompt; empty: the built-in spoken-assistant prompt"),
        Option("--llm-max-tokens", 160, "longest reply in tokens", type=int),
        Option("--llm-history-turns", 8,
               "past exchanges kept per session (past it, the older half is dropped)", type=int),
        Option("--llm-image-detail", "low", "image detail sent with a frame",
               choices=("low", "high", "auto")),
        Option("--llm-timeout", 30.0, "seconds before an endpoint request is abandoned", type=float),
        Option("--llm-retries", 2,
               "extra attempts after a rate limit, server error or refused connection", type=int),
        Option("--llm-threads", 1,
               "CPU threads of the local model (0: torch's default); 1 leaves the other core to "
               "speech recognition and synthesis", type=int),
        Option("--llm-prompt-threads", 2,
               "CPU threads llama.cpp computes a turn's prompt with (the other actors are idle "
               "then)", type=int),
        Option("--llm-yield-ms", 1000,
               "a local model waits, at most this long, while its reply's first sentence is "
               "synthesised on the same CPU (0: never)", type=int),
        Option("--llm-cache-sessions", 4,
               "sessions whose computed prompt the local model keeps, so a turn only computes "
               "what is new", type=int),
        Option("--cache-dir", "cache", "where converted models are kept"),
    ),
    "tts": (
        Option("--tts-backend", "piper", "speech synthesis backend", choices=("piper", "openai")),
        Option("--tts-voice", "",
               "Piper .onnx voice path, or OpenAI voice name; empty: the bundled/default voice"),
        Option("--tts-model", "gpt-4o-mini-tts", "OpenAI TTS model"),
        Option("--tts-speed", 1.0, "speaking rate", type=float),
        Option("--tts-base-url", "", "OpenAI-compatible TTS endpoint; empty: --llm-base-url"),
        Option("--tts-threads", 0, "CPU threads of the Piper voice (0: onnxruntime's default)",
               type=int),
        Option("--tts-chunk-decoder", True,
               "run a Piper voice's decoder a few frames at a time, so a span's audio starts "
               "before all of it is computed (same audio; off: whole spans)", type=_bool),
    ),
    "supervisor": (
        Option("--only", "", "comma-separated actors to run here (others run elsewhere)"),
        Option("--without", "", "comma-separated actors not to run here"),
        Option("--no-broker", False, "do not start a broker: join the one at --bus-pub/--bus-sub",
               type=_bool),
        Option("--ready-timeout", 180.0, "seconds to wait for every actor to report ready",
               type=float),
        Option("--nice", "asr=2,tts=2,llm=2",
               "CPU priority (nice) of actors started here, name=value,...: the models yield to "
               "signaling and media (media also asks for --media-nice)"),
    ),
}


def add_options(parser: argparse.ArgumentParser, groups: Iterable[str],
                environ: Mapping[str, str] | None = None) -> None:
    """Add the flags of ``groups`` to ``parser``, defaulting to their environment variables."""
    environ = os.environ if environ is None else environ
    for group_name in groups:
        group = parser.add_argument_group(group_name)
        for opt in GROUPS[group_name]:
            raw = environ.get(opt.env_name)
            default = opt.default if raw is None else raw
            shown = "(hidden)" if opt.secret else repr(opt.default)
            help_text = f"{opt.help} [env {opt.env_name}; default {shown}]"
            if opt.type is _bool:
                group.add_argument(opt.flag, dest=opt.dest, type=_bool, nargs="?", const=True,
                                   default=_bool(default), metavar="BOOL", help=help_text)
            else:
                group.add_argument(opt.flag, dest=opt.dest, type=opt.type, choices=opt.choices,
                                   default=opt.type(default), help=help_text)


def parse(groups: Iterable[str], argv: list[str] | None = None, *, prog: str | None = None,
          description: str | None = None,
          extend: Any = None) -> argparse.Namespace:
    """Parse ``argv`` for ``groups``; ``extend(parser)`` may add process-specific arguments."""
    groups = list(groups)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_options(parser, groups)
    if extend is not None:
        extend(parser)
    return parser.parse_args(argv)


def to_environ(settings: argparse.Namespace, groups: Iterable[str]) -> dict[str, str]:
    """Render resolved settings as environment variables, for child processes."""
    env: dict[str, str] = {}
    for group_name in groups:
        for opt in GROUPS[group_name]:
            if hasattr(settings, opt.dest):
                value = getattr(settings, opt.dest)
                env[opt.env_name] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return env
