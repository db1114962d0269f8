"""The LLM actor as a real process on a real bus: against a local OpenAI-compatible server (the
real ``openai`` client code runs) and with the real bundled local model."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from pathlib import Path

import pytest
from PIL import Image

from actors.llm import SCREEN_NOTE
from bus.schema import (
    CONTROL,
    METRICS,
    SENTENCE,
    TOKEN,
    Control,
    ControlKind,
    Frame,
    Message,
    Metric,
    Sentence,
    Token,
    Transcript,
)
from engines.llm import BackendSpec, ModelUnavailable
from engines.llm.history import History
from tests import harness
from tests.openai_chat_stub import OpenAIChatStub, Plan

OUT_TOPICS = [TOKEN, SENTENCE, METRICS, CONTROL]
STUB_KEY = "sk-test-123"


def jpeg(color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "JPEG")
    return buf.getvalue()


def of_turn(session: str, turn: int):
    def pred(m: Message) -> bool:
        return ((m.session == session and m.turn == turn
                and isinstance(m, Token | Sentence | Metric))
                or (isinstance(m, Control) and m.kind == ControlKind.ERROR and m.session == session
                and m.turn == turn))
    return pred


async def reply(bus, session: str, turn: int, timeout: float = 30.0) -> list[Message]:
    """Everything of ``turn`` up to and including its final sentence."""
    got: list[Message] = []
    pred = of_turn(session, turn)
    async with asyncio.timeout(timeout):
        while True:
            msg = await bus.recv()
            if pred(msg):
                got.append(msg)
                if isinstance(msg, Sentence) and msg.final:
                    return got


def tokens(msgs: list[Message]) -> list[Token]:
    return [m for m in msgs if isinstance(m, Token)]


def sentences(msgs: list[Message]) -> list[Sentence]:
    return [m for m in msgs if isinstance(m, Sentence) and not m.draft]


def errors(msgs: list[Message]) -> list[Control]:
    return [m for m in msgs if isinstance(m, Control)]


async def start_llm(actors, stub: OpenAIChatStub | None, *args: str, log_name: str = "llm"):
    if stub is None:
        return await actors.start("llm", *args, env={"OPENAI_API_KEY": ""}, log_name=log_name)
    return await actors.start("llm", "--llm-base-url", stub.base_url, *args,
                              env={"OPENAI_API_KEY": STUB_KEY}, log_name=log_name)


# ----------------------------------------------------------------------------- openai-compatible


async def test_reply_streams_in_order_with_image_and_history(broker, actors):
    chunks = ["Hello", " there", "! I see", " a red", " square. It", " looks", " nice."]
    async with OpenAIChatStub(Plan(chunks=chunks)) as stub:
        await start_llm(actors, stub, "--llm-model", "stub-vision", "--llm-image-detail", "high")
        async with harness.client(broker, OUT_TOPICS) as bus:
            picture = jpeg()
            bus.publish(Frame(session="s1", turn=1, jpeg=picture, width=64, height=48))
            await asyncio.sleep(0.3)  # the frame travels on the bulk lane, the text on another
            bus.publish(Transcript(session="s1", turn=1, text="What do you see?"))
            first = await reply(bus, "s1", 1)

            toks = tokens(first)
            assert [t.text for t in toks] == chunks
            assert [t.index for t in toks] == list(range(len(chunks)))
            sents = sentences(first)
            assert [s.text for s in sents] == ["Hello there!", "I see a red square.",
                                               "It looks nice."]
            assert [s.index for s in sents] == [0, 1, 2]
            assert [s.final for s in sents] == [False, False, True]
            stages = {m.stage for m in first if isinstance(m, Metric)}
            assert {"first_token", "first_sentence"} <= stages
            assert not errors(first)

            request = stub.requests[0]
            assert request.body["model"] == "stub-vision"
            assert request.body["stream"] is True
            assert request.headers["Authorization"] == f"Bearer {STUB_KEY}"
            system, user = request.messages
            assert system["role"] == "system" and "see" in system["content"]
            text_part, image_part = user["content"]
            assert text_part == {"type": "text", "text": "What do you see?"}
            assert image_part["type"] == "image_url"
            assert image_part["image_url"] == {
                "url": "data:image/jpeg;base64," + base64.b64encode(picture).decode(),
                "detail": "high"}

            # The next turn has no picture of its own: the old frame is not sent again, and
            # the history holds the first exchange as text only.
            bus.publish(Transcript(session="s1", turn=2, text="And now?"))
            await reply(bus, "s1", 2)
            assert stub.requests[1].messages[1:] == [
                {"role": "user", "content": "What do you see?"},
                {"role": "assistant", "content": "".join(chunks)},
                {"role": "user", "content": "And now?"}]
            assert "image_url" not in json.dumps(stub.requests[1].body)

            # A shared screen is said to be one, in that request only
            bus.publish(Frame(session="s1", turn=3, jpeg=picture, width=64, height=48,
                              kind="screen"))
            await asyncio.sleep(0.3)
            bus.publish(Transcript(session="s1", turn=3, text="Read this."))
            await reply(bus, "s1", 3)
            text_part, _ = stub.requests[2].messages[-1]["content"]
            assert text_part["text"] == f"{SCREEN_NOTE} Read this."
            assert all(SCREEN_NOTE not in str(m["content"]) for m in stub.requests[2].messages[:-1])

            # Another session has its own history; the end of a session clears its own.
            bus.publish(Transcript(session="s2", turn=1, text="Hi"))
            await reply(bus, "s2", 1)
            assert stub.requests[3].messages[1:] == [{"role": "user", "content": "Hi"}]
            bus.publish(Control(session="s1", kind=ControlKind.SESSION_END))
            await asyncio.sleep(0.3)
            bus.publish(Transcript(session="s1", turn=3, text="Hello again"))
            await reply(bus, "s1", 3)
            assert stub.requests[4].messages[1:] == [{"role": "user", "content": "Hello again"}]

            # An early end the user spoke on through is void: the next turn's words include
            # it, so neither it nor its reply stays in the history. (The words so far, sent
            # while the user speaks, start no reply: the requests below would be shifted.)
            bus.publish(Transcript(session="s3", turn=1, text="What", partial=True))
            bus.publish(Transcript(session="s3", turn=1, text="What is", partial=True, pause=True))
            bus.publish(Transcript(session="s3", turn=1, text="What is the"))
            await reply(bus, "s3", 1)
            bus.publish(Control(session="s3", turn=2, kind=ControlKind.INTERRUPT, text="void"))
            bus.publish(Transcript(session="s3", turn=2, text="What is the capital of France?"))
            await reply(bus, "s3", 2)
            bus.publish(Control(session="s3", turn=3, kind=ControlKind.INTERRUPT))
            bus.publish(Transcript(session="s3", turn=3, text="Thanks."))
            await reply(bus, "s3", 3)
            assert stub.requests[5].messages[1:] == [{"role": "user", "content": "What is the"}]
            assert stub.requests[6].messages[1:] == [
                {"role": "user", "content": "What is the capital of France?"}]
            assert stub.requests[7].messages[1:] == [
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "".join(chunks)},
                {"role": "user", "content": "Thanks."}]


async def test_the_first_sentence_goes_to_the_voice_as_a_draft_one_token_sooner(
        broker, actors):
    """A period may end the sentence or not ("blue." + " It", "example." + "org"): the first
    sentence goes out as a draft at once, the next token then confirms it (the sentence
    itself) or withdraws it (an empty draft). Later sentences are not drafted."""
    async with OpenAIChatStub() as stub:
        stub.script(Plan(chunks=["The", " sky", " is", " blue", ".", " It", " is", " nice", "."]),
                    Plan(chunks=["Visit", " example", ".", "org", " now", "."]))
        await start_llm(actors, stub)
        async with harness.client(broker, OUT_TOPICS) as bus:
            bus.publish(Transcript(session="d", turn=1, text="What colour is the sky?"))
            msgs = [m for m in await reply(bus, "d", 1) if isinstance(m, Token | Sentence)]
            said = [(type(m).__name__, m.text, getattr(m, "draft", False)) for m in msgs]
            assert said == [
                ("Token", "The", False), ("Token", " sky", False), ("Token", " is", False),
                ("Token", " blue", False), ("Token", ".", False),
                ("Sentence", "The sky is blue.", True),
                ("Token", " It", False), ("Sentence", "The sky is blue.", False),
                ("Token", " is", False), ("Token", " nice", False), ("Token", ".", False),
                ("Sentence", "It is nice.", False)], said
            assert all(m.index == 0 for m in msgs if isinstance(m, Sentence) and m.draft)

            bus.publish(Transcript(session="d", turn=2, text="Where can I read more?"))
            got = [m for m in await reply(bus, "d", 2) if isinstance(m, Sentence)]
            assert [(m.text, m.draft, m.final) for m in got] == [
                ("Visit example.", True, False), ("", True, False),
                ("Visit example.org now.", True, False),
                ("Visit example.org now.", False, True)], got


async def test_endpoint_errors_become_error_events_and_a_spoken_apology(broker, actors):
    async with OpenAIChatStub() as stub:
        first = await start_llm(actors, stub, "--llm-timeout", "1", "--llm-retries", "2")
        async with harness.client(broker, OUT_TOPICS) as bus:

            async def failing_turn(turn: int, *plans: Plan) -> tuple[Control, Sentence, int]:
                stub.script(*plans)
                before = len(stub.requests)
                bus.publish(Transcript(session="e", turn=turn, text=f"question {turn}"))
                msgs = await reply(bus, "e", turn)
                assert not tokens(msgs)
                (error,), (apology,) = errors(msgs), sentences(msgs)
                assert apology.final and apology.text.startswith("Sorry")
                return error, apology, len(stub.requests) - before

            error, _, calls = await failing_turn(
                1, Plan(status=401, code="invalid_api_key", message="Incorrect API key"))
            assert "API key" in error.text and "401" in error.text and error.actor == "llm"
            assert calls == 1  # a bad key is not retried

            error, _, calls = await failing_turn(2, *[Plan(status=429)] * 3)
            assert "rate limiting" in error.text
            assert calls == 3  # one attempt and exactly two retries

            error, _, calls = await failing_turn(3, Plan(hang=True))
            assert "did not answer within 1 s" in error.text
            assert calls == 1  # a timeout is not retried: the user already waited

            # A server error followed by success: the retry answers, no error is shown.
            stub.script(Plan(status=500), Plan(chunks=["Fine", " now."]))
            bus.publish(Transcript(session="e", turn=4, text="question 4"))
            msgs = await reply(bus, "e", 4)
            assert not errors(msgs)
            assert [s.text for s in sentences(msgs)] == ["Fine now."]
            # Turns that produced nothing left no trace in the history.
            assert stub.requests[-1].messages[1:] == [{"role": "user", "content": "question 4"}]

            # An endpoint that names what it lacks is met halfway, without an error: a newer
            # token limit parameter, and a model that takes no pictures.
            stub.script(
                Plan(status=400, message="Unsupported parameter: 'max_tokens' is not supported "
                                         "with this model. Use 'max_completion_tokens' instead."),
                Plan(status=400, message="Invalid content type. image_url is only supported by "
                                         "certain models."),
                Plan(chunks=["Blind", " but", " fine."]))
            before = len(stub.requests)
            bus.publish(Frame(session="e", turn=5, jpeg=jpeg(), width=64, height=48))
            await asyncio.sleep(0.3)
            bus.publish(Transcript(session="e", turn=5, text="what is this?"))
            msgs = await reply(bus, "e", 5)
            assert not errors(msgs)
            assert [s.text for s in sentences(msgs)] == ["Blind but fine."]
            tried = stub.requests[before:]
            assert len(tried) == 3
            assert "max_tokens" in tried[0].body and "max_completion_tokens" in tried[1].body
            assert "image_url" in json.dumps(tried[1].body)
            assert "image_url" not in json.dumps(tried[2].body)
            bus.publish(Transcript(session="e", turn=6, text="and now?"))
            await reply(bus, "e", 6)
            assert "cannot see" in stub.requests[-1].messages[0]["content"]  # no longer told

        # Nothing listens on the port: the connection is refused, retried, then reported.
        await asyncio.to_thread(first.stop)  # the only llm worker left is the next one
        closed = f"http://127.0.0.1:{harness.free_port()}/v1"
        await actors.start("llm", "--llm-base-url", closed, "--llm-retries", "1",
                           env={"OPENAI_API_KEY": ""}, log_name="llm-refused")
        async with harness.client(broker, OUT_TOPICS) as bus:
            bus.publish(Transcript(session="r", turn=1, text="anyone there?"))
            msgs = await reply(bus, "r", 1)
            (error,) = errors(msgs)
            assert "connection refused" in error.text and closed in error.text
            assert sentences(msgs)[-1].text.startswith("Sorry")


async def test_interrupt_and_new_utterance_cancel_the_reply_with_nothing_stale(broker, actors):
    slow = Plan(chunks=[f" Word {i}." for i in range(100)], delay=0.05)
    async with OpenAIChatStub() as stub:
        await start_llm(actors, stub)
        async with harness.client(broker, OUT_TOPICS) as bus:
            seen: list[Message] = []

            async def until(pred) -> Message:
                while True:
                    msg = await bus.recv()
                    seen.append(msg)
                    if pred(msg):
                        return msg

            def token_of(turn: int, index: int):
                return lambda m: isinstance(m, Token) and m.turn == turn and m.index == index

            async with asyncio.timeout(30):
                # Turn 1 is stopped by an interrupt (the user started speaking again).
                stub.script(slow)
                bus.publish(Transcript(session="i", turn=1, text="count slowly"))
                await until(token_of(1, 2))
                bus.publish(Control(session="i", turn=2, kind=ControlKind.INTERRUPT))
                await stub.wait_for(lambda s: s.requests[0].aborted)
                # Turn 2 is stopped by the transcript of turn 3 arriving.
                stub.script(slow, Plan(chunks=["Done", "."]))
                bus.publish(Transcript(session="i", turn=2, text="count again"))
                await until(token_of(2, 2))
                bus.publish(Transcript(session="i", turn=3, text="stop"))
                await until(lambda m: isinstance(m, Sentence) and m.turn == 3 and m.final)
                seen += await harness.collect(bus, lambda m: True, 0.5)

    mine = [m for m in seen if isinstance(m, Token | Sentence) and m.session == "i"]
    assert stub.requests[1].aborted
    for old, new in ((1, 2), (2, 3)):
        first_new = next(k for k, m in enumerate(mine) if m.turn == new)
        assert not [m for m in mine[first_new:] if m.turn == old]  # nothing stale after
        assert not [m for m in mine if m.turn == old and isinstance(m, Sentence) and m.final]
        assert len([m for m in mine if m.turn == old and isinstance(m, Token)]) < 100
    # Interrupted replies are remembered as far as they were produced.
    said = {t: "".join(m.text for m in mine if isinstance(m, Token) and m.turn == t)
            for t in (1, 2)}
    assert stub.requests[2].messages[1:] == [
        {"role": "user", "content": "count slowly"},
        {"role": "assistant", "content": said[1].strip()},
        {"role": "user", "content": "count again"},
        {"role": "assistant", "content": said[2].strip()},
        {"role": "user", "content": "stop"}]


# ----------------------------------------------------------------------------- local model


@pytest.mark.slow
async def test_bundled_local_model_answers_streamed_and_stops(broker, actors):
    proc = await start_llm(actors, None, "--llm-max-tokens", "24")
    async with harness.client(broker, OUT_TOPICS) as bus:
        bus.publish(Frame(session="l", turn=1, jpeg=jpeg(), width=64, height=48))
        await asyncio.sleep(0.3)
        bus.publish(Transcript(session="l", turn=1, text="What is the capital of France?"))
        msgs = await reply(bus, "l", 1, timeout=60)
        toks = tokens(msgs)
        assert len(toks) >= 2  # streamed, not one block
        answer = "".join(t.text for t in toks)
        assert "paris" in answer.lower()
        sents = sentences(msgs)
        assert sents[-1].final and " ".join(s.text for s in sents).strip()
        assert not errors(msgs)

        bus.publish(Transcript(session="l", turn=2, text="Tell me a long story about a dragon."))
        await harness.recv_until(bus, lambda m: isinstance(m, Token) and m.turn == 2, 60)
        bus.publish(Control(session="l", turn=3, kind=ControlKind.INTERRUPT))
        bus.publish(Transcript(session="l", turn=3, text="Say hello."))
        after: list[Message] = []
        async with asyncio.timeout(60):
            while True:
                msg = await bus.recv()
                if msg.session == "l" and isinstance(msg, Token | Sentence):
                    after.append(msg)
                    if isinstance(msg, Sentence) and msg.turn == 3 and msg.final:
                        break
    first_new = next(k for k, m in enumerate(after) if m.turn == 3)
    assert not [m for m in after[first_new:] if m.turn == 2]
    assert not [m for m in after if m.turn == 2 and isinstance(m, Sentence) and m.final]
    log = proc.output()
    assert log.count("llm_cannot_see") == 1  # said once, and the picture was not used
    assert "llm_interrupted" in log
    # Every turn reused computed prompt: the system prompt's from the warm-up, then the
    # session's own (the fast path's key/value caches).
    generated = [line for line in log.splitlines()
                 if "llm_generated" in line and "session=l " in line + " "]
    reused = [int(line.split("reused=")[1].split()[0]) for line in generated]
    assert len(reused) == 3 and min(reused) > 30


async def test_local_model_holds_the_rest_of_the_reply_until_its_first_sound(broker, actors):
    await start_llm(actors, None, "--llm-max-tokens", "64", "--llm-yield-ms", "30000")
    async with harness.client(broker, OUT_TOPICS) as bus:
        bus.publish(Transcript(session="y", turn=1, text="Tell me a fun fact about cats."))
        first = await harness.recv_until(
            bus, lambda m: isinstance(m, Sentence) and m.session == "y" and not m.draft, 60)
        assert not first.final
        held: list[Message] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.5):  # ~30 tokens' time at full speed
                while True:
                    held.append(await bus.recv())
        # a token or two were under way when the hold came; then nothing until the first sound
        assert len([m for m in held if isinstance(m, Token) and m.session == "y"]) <= 2, held
        bus.publish(Metric(session="y", turn=1, stage="first_packet", at=time.time()))
        rest = await reply(bus, "y", 1, timeout=60)
    assert len(tokens(rest)) >= 5 and sentences(rest)[-1].final


@pytest.mark.slow
async def test_any_causal_lm_folder_loads_and_generation_stops_midway(tmp_path: Path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engines.llm.gguf_convert import bundled_gguf, converted_folder, ensure_converted
    from engines.llm.local_backend import LocalBackend

    cache = harness.ROOT / "cache"
    bundled = ensure_converted(bundled_gguf(), cache)  # converted once, then reused
    marker = (bundled / "parley-converted.json").stat().st_mtime
    assert ensure_converted(bundled_gguf(), cache) == bundled == converted_folder(
        bundled_gguf(), cache)
    assert (bundled / "parley-converted.json").stat().st_mtime == marker

    tokenizer = AutoTokenizer.from_pretrained(bundled)
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=-1))  # random weights: it must never stop on its own
    folder = tmp_path / "tiny-llama"
    tiny.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    backend = LocalBackend(BackendSpec(backend="local", model=str(folder), max_tokens=400,
                                       cache_dir=str(tmp_path / "cache")))
    await backend.load()
    deltas: list[str] = []
    stream = backend.stream([{"role": "user", "content": "hello"}])
    async for delta in stream:
        deltas.append(delta)
        if len(deltas) == 3:
            break
    await stream.aclose()  # returns once the worker thread has stopped
    assert len(deltas) == 3 and all(deltas)
    assert 3 <= backend.last_generated < 400
    await backend.aclose()


async def test_missing_local_model_fails_at_start_with_a_clear_message(broker, tmp_path: Path):
    proc = harness.Proc([harness.PYTHON, "-m", "actors.llm", "--llm-model",
                         str(tmp_path / "no-such-model")],
                        harness.bus_env(broker, OPENAI_API_KEY=""), tmp_path / "llm.log")
    code = await asyncio.to_thread(proc.popen.wait, 60)
    out = proc.output()
    proc.stop()
    assert code == 3
    assert "no-such-model" in out and "not a model folder" in out
    assert "Traceback" not in out
    with pytest.raises(ModelUnavailable, match="no GGUF file"):
        from engines.llm.local_backend import resolve_model
        resolve_model(BackendSpec(model=str(tmp_path / "x.gguf")))


def test_history_is_bounded_in_halves_and_text_only() -> None:
    history = History(max_turns=4, max_chars=100)
    history.add("one", "first reply")
    history.add("two", "")  # nothing produced: dropped, roles keep alternating
    for user in ("three", "four", "five"):
        history.add(user, f"{user} reply")
    assert history.messages("sys", "six") == [
        {"role": "system", "content": "sys"},
        *[{"role": role, "content": text} for user, reply in (
            ("one", "first reply"), ("three", "three reply"), ("four", "four reply"),
            ("five", "five reply")) for role, text in (("user", user), ("assistant", reply))],
        {"role": "user", "content": "six"}]
    # A fifth exchange: the oldest go at once, down to half the bound (the prompt's computed
    # prefix then stays valid for the next turns).
    history.add("six", "six reply")
    assert [m["content"] for m in history.prefix("")] == ["five", "five reply",
                                                          "six", "six reply"]
    history.add("seven", "seven reply")
    assert len(history) == 3
    history.add("long question " * 4, "long answer")
    assert len(history) == 1  # over the character budget: down to half of it, newest kept
    history.clear()
    assert history.messages("", "hi") == [{"role": "user", "content": "hi"}]
