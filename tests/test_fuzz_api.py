"""Schemathesis against the real server: requests generated from /openapi.json, valid and invalid, never get a
5xx, and every answer conforms to the document (a documented status, its content type, body schema and headers).

Bounded here (~150 cases, a tiny checkpoint); `benchmarks/bench_fuzz.py` runs the same harness for 10,000+.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import checks
from schemathesis.generation import GenerationMode

from tests.conftest import TinyFactory
from tests.server_utils import MODEL, Server, data_url
from vlmbridge.server import create_app
from vlmbridge.server.factory import build_slot
from vlmbridge.server.openapi import install_openapi
from vlmbridge.server.runner import ServerThread
from vlmbridge.settings import Settings

API_KEY = "fuzz-key"
# The server's settings for fuzzing: a small context bounds every generation (random weights rarely stop early).
SERVER_SETTINGS: dict[str, Any] = {
    "served_model_name": MODEL,
    "api_keys": [API_KEY],
    "context_length": 160,
    "max_images": 2,
    "request_timeout": 60,
}
# Conformance to the document; a 5xx is counted apart (and `not_a_server_error` would only repeat it). Requests the
# document calls invalid must be refused (4xx); the converse (positive_data_acceptance) cannot hold: the schema does
# not say that a text part needs `text`, nor which model is served.
CONFORMANCE = (
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
)
# How the case budget is shared: the chat route has by far the largest input space.
WEIGHTS = {"POST /v1/chat/completions": 6, "POST /v1/tokenize": 3}
_IMAGE = data_url(32, 32, seed=3)


@dataclass
class Finding:
    operation: str
    request: str
    status: int
    response: str

    def __str__(self) -> str:
        return f"{self.operation} -> {self.status}\n  request:  {self.request}\n  response: {self.response}"


@dataclass
class FuzzReport:
    cases: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    streams: int = 0  # 200 answers that were event streams (their events are validated too)
    unsendable: int = 0  # generated requests the HTTP client refused to send
    server_errors: list[Finding] = field(default_factory=list)
    conformance: list[Finding] = field(default_factory=list)

    def summary(self, show: int = 10) -> str:
        lines = [
            f"cases: {self.cases}",
            "by operation: " + ", ".join(f"{op} {n}" for op, n in sorted(self.by_operation.items())),
            "by status: " + ", ".join(f"{status}: {n}" for status, n in sorted(self.by_status.items())),
            f"200 event streams: {self.streams}; generated but unsendable: {self.unsendable}",
            f"5xx (incl. server errors inside 200 streams): {len(self.server_errors)}",
            f"conformance failures: {len(self.conformance)}",
        ]
        for title, found in (("5xx", self.server_errors), ("conformance", self.conformance)):
            lines += [f"--- {title} #{i + 1}\n{finding}" for i, finding in enumerate(found[:show])]
        return "\n".join(lines)


def _clip(text: str, limit: int = 1500) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def _valid_core(data: st.DataObject, body: dict[str, Any], variant: int, *, chat: bool) -> None:
    """Most generated bodies fail validation before any model work; give two in three a valid conversation (text
    or an image, streamed or not) and the served model name, so the fuzzed sampling fields, the chat template and
    the response schemas are reached too."""
    # Draw the same things whatever the variant: Hypothesis refuses draws that depend on outside state.
    text = data.draw(st.text(max_size=40), label="text")
    detail = data.draw(st.sampled_from(["auto", "low", "high"]), label="detail")
    if variant % 3 == 0:
        return
    if variant in (1, 4):
        messages: list[dict[str, Any]] = [{"role": "user", "content": text or "hi"}]
    else:
        image = {"type": "image_url", "image_url": {"url": _IMAGE, "detail": detail}}
        messages = [{"role": "user", "content": [image, {"type": "text", "text": text}]}]
    body["messages"] = messages
    body["model"] = MODEL
    if chat and variant in (4, 5):  # the generator seldom streams by itself
        body["stream"] = True
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 8  # absent, generation would run to the end of the context: slow, and nothing new


def _stream_findings(text: str) -> tuple[list[str], list[str]]:
    """(conformance problems, server errors) of a whole SSE body. Schemathesis validates each event against the
    document; what it cannot see is the order (`[DONE]` last) and a 500 that came after the 200 was sent."""
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return ["the stream does not end with data: [DONE]"], []
    errors = [raw for raw in events[:-1] if '"internal_error"' in raw and json.loads(raw).get("error")]
    return [], errors


def fuzz(
    base_url: str,
    total: int,
    *,
    seed: int | None = None,
    on_case: Callable[[FuzzReport], None] | None = None,
    report: FuzzReport | None = None,
) -> FuzzReport:
    """About `total` generated requests against a running server, shared over its operations by WEIGHTS, each
    operation's share split between valid (positive) and invalid (negative) inputs. `seed=None`: derandomized.
    Counts go into `report` when given (several rounds, one report)."""
    # An explicit config: no schemathesis.toml discovered from the working directory, and whole streams read.
    config = schemathesis.Config.from_dict({"max-stream-events": 10_000})
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config, timeout=30)
    schema.validate()  # the document itself is valid OpenAPI
    operations = [result.ok() for result in schema.get_all_operations()]
    weight_sum = sum(WEIGHTS.get(op.label, 1) for op in operations)
    report = report if report is not None else FuzzReport()
    session = requests.Session()

    for operation in operations:
        share = max(2, total * WEIGHTS.get(operation.label, 1) // weight_sum)
        for mode, budget in ((GenerationMode.POSITIVE, share - share // 3), (GenerationMode.NEGATIVE, share // 3)):
            run = _operation_test(operation, mode, base_url, session, report, on_case)
            run = settings(
                max_examples=max(1, budget),
                deadline=None,
                database=None,  # nothing written into the work tree
                derandomize=seed is None,
                phases=[Phase.generate],  # findings are collected, not raised: nothing to shrink
                suppress_health_check=list(HealthCheck),
            )(run)
            if seed is not None:
                run = hypothesis_seed(seed)(run)
            with contextlib.suppress(Unsatisfiable):  # no invalid input exists (no parameters, no body)
                run()
    session.close()
    return report


def _operation_test(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    session: requests.Session,
    report: FuzzReport,
    on_case: Callable[[FuzzReport], None] | None,
) -> Callable[[], None]:
    keyed = {"Authorization": f"Bearer {API_KEY}"}

    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Any, data: st.DataObject) -> None:
        # Shares by case number: Hypothesis' own draws favour their simplest value, which would skew them.
        if mode is GenerationMode.POSITIVE:
            body = case.body if isinstance(case.body, dict) else {}
            _valid_core(data, body, report.cases % 6, chat=operation.path == "/v1/chat/completions")
        # One in ten goes without the key: the 401 must be documented and enveloped too.
        headers = dict(keyed) if report.cases % 10 != 9 else {"Authorization": ""}
        try:
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=120)
        except (requests.ConnectionError, requests.Timeout) as exc:  # dropped or hung: as bad as a 5xx
            report.cases += 1
            report.server_errors.append(Finding(case.operation.label, _request(case), 0, f"no answer: {exc!r}"))
            return
        except requests.RequestException:  # one requests refuses to send (e.g. an invalid header): not a request
            report.unsendable += 1
            return
        _record(report, case, response, headers)
        if on_case is not None:
            on_case(report)

    return run


def _request(case: Any) -> str:
    try:
        return _clip(json.dumps(case.body, ensure_ascii=True))
    except (TypeError, ValueError):
        return _clip(repr(case.body))


def _record(report: FuzzReport, case: Any, response: schemathesis.Response, headers: dict[str, str]) -> None:
    report.cases += 1
    report.by_status[response.status_code] += 1
    report.by_operation[case.operation.label] += 1

    def finding(text: str) -> Finding:
        return Finding(case.operation.label, _request(case), response.status_code, _clip(text))

    if response.status_code >= 500:
        report.server_errors.append(finding(response.text))
    try:
        case.validate_response(response, checks=list(CONFORMANCE), headers=headers)
    except Exception as exc:  # schemathesis raises a group of check failures; keep its report
        report.conformance.append(finding(f"{type(exc).__name__}: {exc}"))
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code == 200 and content_type.startswith("text/event-stream"):
        report.streams += 1
        problems, errors = _stream_findings(response.text)
        report.conformance += [finding(problem) for problem in problems]
        report.server_errors += [finding(f"error event in a 200 stream: {error}") for error in errors]


@pytest.fixture(scope="module")
def server(tiny_model: TinyFactory) -> Iterator[Server]:
    cfg = Settings(**SERVER_SETTINGS)
    slot = build_slot(cfg, tiny_model("qwen3_vl"))
    app = create_app(cfg, slot)
    install_openapi(app, cfg)  # idempotent: also works once create_app installs it itself
    with ServerThread(app) as base_url:
        slot.wait_loaded(120)
        yield Server(base_url=base_url, slot=slot, settings=cfg)


def test_fuzz_no_5xx_and_conforms(server: Server) -> None:
    report = fuzz(server.base_url, total=150)
    print(report.summary())
    assert report.cases >= 100
    assert report.by_status[200] >= 10, "too few valid requests reached the model to check the 200 answers"
    assert not report.server_errors, report.summary()
    assert not report.conformance, report.summary()
    # The server took all that and still serves.
    keyed = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    r = server.post(body, headers=keyed)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
