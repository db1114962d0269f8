"""The model stages of a turn on a GPU: Whisper and the LLM through transformers on CUDA.

What ``--asr-device cuda`` and ``--llm-device cuda`` would spend per turn: Whisper's encoder
over its 30 s window plus a greedy decode of a short question's tokens, and the LLM's prompt
step for a turn's new tokens on top of a cached history plus its per-token decode. Token counts
are fixed (a question of ``--asr-tokens`` tokens, ``--new-tokens`` new prompt tokens after a
``--history`` token history), so the figures do not depend on what the weights say.

By default the models are the bundled architectures (Whisper tiny.en, SmolLM2-135M) with random
weights: their shapes, hence their timing, are the real ones, and the script needs no files (a
GPU machine may hold none of the bundled weights). ``--asr``/``--llm`` take a Hugging Face
folder or id with real weights instead.

    python bench/gpu.py [--device cuda] [--dtype float16] [--reps 20] [--asr FOLDER] [--llm FOLDER]

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

# The bundled models' architectures (their config.json, the fields that set the shapes).
WHISPER_TINY_EN = dict(
    vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, decoder_layers=4,
    encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536,
    decoder_ffn_dim=1536, max_source_positions=1500, max_target_positions=448,
    decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256,
)
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)
WINDOW_FRAMES = 3000  # Whisper's 30 s input window (transformers always encodes all of it)


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> list[float]:
    """Milliseconds per call, the device synchronised around each one."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - start) * 1000)
    return out


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def p95(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def load(name: str, pretrained: type, build: Callable[[], torch.nn.Module],
         device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The weights of ``name`` (a folder or id), or without one ``build()``: the bundled shapes,
    random weights (seeded, so every run times the same model)."""
    if name:
        model = pretrained.from_pretrained(name, dtype=dtype)
    else:
        torch.manual_seed(0)
        model = build().to(dtype)
    return model.to(device).eval()


@torch.inference_mode()
def bench_whisper(model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                  tokens: int, reps: int) -> dict[str, float]:
    """Encoder over the window, then a greedy decode of ``tokens`` tokens after the 4 prompt ones."""
    mels = model.config.num_mel_bins
    features = torch.randn(1, mels, WINDOW_FRAMES, device=device, dtype=dtype)
    start = model.config.decoder_start_token_id
    # A multilingual model's four prompt tokens (start, language, task, no timestamps); with
    # random weights only their number matters, and English-only models need fewer.
    prompt = torch.tensor([[start, start + 1, start + 2, start + 5]], device=device)

    def encode() -> torch.Tensor:
        return model.model.encoder(features).last_hidden_state

    def transcribe() -> None:
        hidden = encode()
        out = model(encoder_outputs=(hidden,), decoder_input_ids=prompt, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(tokens - 1):
            out = model(encoder_outputs=(hidden,), decoder_input_ids=token,
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)

    enc = timed(encode, device, reps)
    full = timed(transcribe, device, reps)
    return {"encode_p50_ms": p50(enc), "transcribe_p50_ms": p50(full),
            "transcribe_p95_ms": p95(full)}


@torch.inference_mode()
def bench_llm(model: torch.nn.Module, device: torch.device, history: int, new: int, decode: int,
              reps: int) -> dict[str, float]:
    """A turn's prompt step on a cached history (the first token), then ms per decoded token."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    past_ids = torch.randint(3, vocab, (1, history), generator=gen).to(device)
    new_ids = torch.randint(3, vocab, (1, new), generator=gen).to(device)
    cache = model(past_ids, use_cache=True).past_key_values

    def first_token() -> torch.Tensor:
        extra = cache.get_seq_length() - history
        if extra:
            cache.crop(-extra)  # negative: drop that many (the one form every version takes)
        logits = model(new_ids, past_key_values=cache, use_cache=True).logits
        return logits[:, -1:].argmax(-1)

    def reply() -> None:
        token = first_token()
        for _ in range(decode):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    ttft = timed(first_token, device, reps)
    full = timed(reply, device, reps)
    per_token = [(f - p50(ttft)) / decode for f in full]
    return {"first_token_p50_ms": p50(ttft), "first_token_p95_ms": p95(ttft),
            "ms_per_token_p50": p50(per_token)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--asr", default="",
                        help="Whisper folder/id (default: tiny.en shapes, random weights)")
    parser.add_argument("--llm", default="",
                        help="causal LM folder/id (default: SmolLM2-135M shapes, random weights)")
    parser.add_argument("--asr-tokens", type=int, default=14, help="tokens of the transcript decoded")
    parser.add_argument("--history", type=int, default=200, help="prompt tokens already cached")
    parser.add_argument("--new-tokens", type=int, default=13, help="prompt tokens a turn adds")
    parser.add_argument("--decode", type=int, default=24, help="reply tokens decoded")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu, or run this on a GPU machine")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    weights = "real" if (args.asr or args.llm) else "random (bundled shapes: timing only)"

    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    whisper = load(args.asr, WhisperForConditionalGeneration,
                   lambda: WhisperForConditionalGeneration(WhisperConfig(**WHISPER_TINY_EN)),
                   device, dtype)
    asr = bench_whisper(whisper, device, dtype, args.asr_tokens, args.reps)
    llm_model = load(args.llm, AutoModelForCausalLM,
                     lambda: LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)), device, dtype)
    llm = bench_llm(llm_model, device, args.history, args.new_tokens, args.decode, args.reps)

    print(f"\nModel stages on {name}, {args.dtype}, weights {weights}, {args.reps} reps\n")
    print(f"  {'stage':48s} {'p50':>8s} {'p95':>8s}")
    print(f"  {'Whisper encoder (30 s window)':48s} {asr['encode_p50_ms']:8.1f}")
    print(f"  {f'Whisper transcript ({args.asr_tokens} tokens)':48s} "
          f"{asr['transcribe_p50_ms']:8.1f} {asr['transcribe_p95_ms']:8.1f}")
    print(f"  {f'LLM first token ({args.new_tokens} new on {args.history} cached)':48s} "
          f"{llm['first_token_p50_ms']:8.1f} {llm['first_token_p95_ms']:8.1f}")
    print(f"  {'LLM ms per token':48s} {llm['ms_per_token_p50']:8.2f}")
    print(json.dumps({"bench": "gpu", "device": name, "dtype": args.dtype, "weights": weights,
                      "asr": asr, "llm": llm, "args": vars(args)}))


if __name__ == "__main__":
    main()
