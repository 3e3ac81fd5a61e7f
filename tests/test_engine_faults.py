"""No request can stop the engine: a failing step fails only its own requests, and a dead or stuck worker shows.

Faults are forced with the engine's test-only `fault_hook(stage, request_id)`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import TinyFactory
from tests.helpers import generate
from vlmbridge.engine.transformers.batch import RunningBatch
from vlmbridge.engine.transformers.engine import EngineLimits, FaultHook, TransformersEngine
from vlmbridge.engine.types import ChatMessage, GenerationChunk, GenerationRequest, SamplingParams
from vlmbridge.errors import EngineFailedError, EngineNotReadyError
from vlmbridge.loader import LoadOptions, load_model
from vlmbridge.output.client import ChunkStream

PROMPTS = {
    "a": "Hi",
    "victim": "Describe a sunny beach with palm trees and children playing",
    "c": "Solve 3x + 5 = 20",
}
Make = Callable[..., TransformersEngine]


@pytest.fixture
def make_engine(tiny_model: TinyFactory) -> Iterator[Make]:
    engines: list[TransformersEngine] = []

    def make(family: str = "qwen2", **limits: float) -> TransformersEngine:
        loaded = load_model(tiny_model(family), LoadOptions(device="cpu", dtype="fp32"))
        # Requests submitted together land in one prefill batch; no prefix cache unless a test asks for it.
        settings = {"batch_wait_s": 0.3, "prefix_cache_bytes": 0, **limits}
        engine = TransformersEngine(loaded, "tiny", EngineLimits(**settings))  # type: ignore[arg-type]
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.shutdown()


def request(rid: str, tokens: int = 8, **sampling: object) -> GenerationRequest:
    params = {"max_new_tokens": tokens, "temperature": 0.0, "repetition_penalty": 1.0, "ignore_eos": True}
    return GenerationRequest(
        messages=(ChatMessage("user", PROMPTS.get(rid, rid)),),
        sampling=SamplingParams(**{**params, **sampling}),  # type: ignore[arg-type]
        request_id=rid,
    )


def tokens(chunks: list[GenerationChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def raise_on(stage: str, rid: str, call: int, exc: BaseException, always: bool = False) -> FaultHook:
    """A hook that raises `exc` the `call`-th time `stage` runs for `rid` (1-based): then only, or from then on."""
    seen = 0

    def hook(at: str, request_id: str) -> None:
        nonlocal seen
        if at == stage and request_id == rid:
            seen += 1
            if seen == call or (always and seen > call):
                raise exc

    return hook


def eventually(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_serving(engine: TransformersEngine) -> None:
    assert engine.state == "ready", engine.state_reason
    last = list(generate(engine, request("after", tokens=3)))[-1]
    assert last.finish_reason == "length" and last.error is None


def assert_classified(chunk: GenerationChunk, code: str) -> None:
    assert chunk.finish_reason == "error"
    assert isinstance(chunk.error, EngineFailedError)
    assert chunk.error.code == code
    assert "secret" not in chunk.error.message and len(chunk.error.message) < 200  # never the exception's text


@pytest.mark.parametrize(("stage", "code"), [("sample", "sampling_failed"), ("accept", "accept_failed")])
def test_a_failing_row_fails_alone_and_its_batch_goes_on(make_engine: Make, stage: str, code: str) -> None:
    # A wide batch window: the three submissions must land in one batch even on a busy 2-core runner (0.3 s flaked).
    engine = make_engine(batch_wait_s=1.5)
    alone = {rid: tokens(list(generate(engine, request(rid)))) for rid in PROMPTS}
    engine.fault_hook = raise_on(stage, "victim", 3, RuntimeError("secret tensor([1., 2.]) payload"))
    streams = {rid: generate(engine, request(rid)) for rid in PROMPTS}
    got = {rid: list(s) for rid, s in streams.items()}
    assert engine.stats().max_batch_seen == 3  # they really ran as one batch
    victim = got.pop("victim")
    assert_classified(victim[-1], code)
    assert tokens(victim) == alone["victim"][:2]  # two tokens went out before the third one failed
    for rid, chunks in got.items():
        assert chunks[-1].finish_reason == "length" and chunks[-1].error is None
        assert tokens(chunks) == alone[rid]
    assert_serving(engine)


def test_a_failing_prefill_fails_only_its_request(make_engine: Make) -> None:
    engine = make_engine()
    alone = {rid: tokens(list(generate(engine, request(rid)))) for rid in PROMPTS}
    engine.fault_hook = raise_on("prefill", "victim", 1, RuntimeError("secret"), always=True)  # a bad prompt
    got = {rid: list(s) for rid, s in {rid: generate(engine, request(rid)) for rid in PROMPTS}.items()}
    assert_classified(got.pop("victim")[-1], "prefill_failed")
    for rid, chunks in got.items():  # the batched prefill failed; the others were retried one by one
        assert tokens(chunks) == alone[rid]
    assert_serving(engine)


def test_a_failed_decode_forward_fails_its_rows_and_leaves_a_clean_batch(make_engine: Make) -> None:
    engine = make_engine(batch_wait_s=0.0)
    alone = {rid: tokens(list(generate(engine, request(rid)))) for rid in PROMPTS}
    long = generate(engine, request("long", tokens=200))
    it = iter(long)
    for _ in range(3):
        next(it)  # decoding now; the victim joins the running batch
    engine.fault_hook = raise_on("decode", "victim", 2, RuntimeError("secret"))
    victim = list(generate(engine, request("victim")))
    assert_classified(victim[-1], "decode_failed")
    assert_classified(list(it)[-1], "decode_failed")  # a forward pass fails every row it ran
    engine.fault_hook = None
    streams = {rid: generate(engine, request(rid)) for rid in PROMPTS}
    for rid, stream in streams.items():  # a fresh batch after the failure: same tokens as alone
        assert tokens(list(stream)) == alone[rid]
    assert_serving(engine)


def test_a_failure_filing_the_kv_leaves_the_request_done(make_engine: Make) -> None:
    engine = make_engine(prefix_cache_bytes=64 << 20)
    engine.fault_hook = raise_on("remember", "victim", 1, RuntimeError("secret"))
    chunks = list(generate(engine, request("victim")))
    assert chunks[-1].finish_reason == "length" and chunks[-1].error is None
    assert engine.prefix_cache is not None and engine.prefix_cache.stats.entries == 0
    engine.fault_hook = None
    list(generate(engine, request("victim")))
    assert engine.prefix_cache.stats.entries == 1
    assert_serving(engine)


def test_an_unexpected_loop_failure_fails_the_requests_in_flight_and_the_loop_goes_on(
    make_engine: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine()
    original = RunningBatch.drop_finished
    failed = threading.Event()

    def flaky(self: RunningBatch) -> None:
        if self.seqs and not failed.is_set():
            failed.set()
            raise RuntimeError("secret")
        original(self)

    monkeypatch.setattr(RunningBatch, "drop_finished", flaky)
    prepared = [engine.prepare(request(rid)) for rid in PROMPTS]  # first, so all three are queued together
    for stream in [engine.submit(p) for p in prepared]:
        last = list(stream)[-1]  # the engine's own outputs: token ids, no text
        assert last.finish_reason == "error" and isinstance(last.error, EngineFailedError)
        assert last.error.code == "engine_error"
    assert failed.is_set()
    assert_serving(engine)


class _WorkerKiller(BaseException):
    """Not an Exception: nothing inside the loop catches it, so it ends the worker thread."""


def test_a_dead_worker_turns_the_engine_failed_and_answers_everyone(make_engine: Make) -> None:
    engine = make_engine(max_batch_size=1)
    engine.fault_hook = raise_on("sample", "victim", 3, _WorkerKiller())
    running = generate(engine, request("victim", tokens=50))
    waiting = [generate(engine, request(rid, tokens=50)) for rid in ("a", "c")]  # one row: these must wait
    assert_classified(list(running)[-1], "engine_died")
    for stream in waiting:
        last = list(stream)[-1]  # ends instead of hanging
        assert last.finish_reason == "error" and isinstance(last.error, EngineNotReadyError)
    assert engine.state == "failed"
    assert "engine worker stopped" in engine.state_reason
    with pytest.raises(EngineNotReadyError):
        generate(engine, request("a"))


def test_a_stuck_worker_reports_failed_until_it_moves_again(make_engine: Make) -> None:
    engine = make_engine(stall_after_s=0.3)
    release, stuck = threading.Event(), threading.Event()

    def hang(stage: str, request_id: str) -> None:
        if stage == "decode" and not stuck.is_set():
            stuck.set()
            release.wait(30)

    engine.fault_hook = hang
    stream: ChunkStream = generate(engine, request("a"))
    try:
        assert stuck.wait(30)
        assert eventually(lambda: engine.state == "failed", timeout=10)
        assert engine.state_reason.startswith("engine worker stuck for")
        assert time.monotonic() - engine.last_heartbeat > 0.3
        with pytest.raises(EngineNotReadyError, match="stuck"):
            generate(engine, request("c"))
    finally:
        release.set()
    assert list(stream)[-1].finish_reason == "length"
    assert engine.state == "ready"
    assert_serving(engine)
