"""Token-based migration's bookkeeping: which requests can move, the continuation request, the
chunks the client gets. (The move itself, on real engines: integration_tests/test_serve_placement.py.)"""

from __future__ import annotations

import json

import pytest

from loader_plugins.serve.catalog import ModelSpec, ServerSpec
from loader_plugins.serve.local import LocalEngine as Engine
from loader_plugins.serve.migration import DEFAULT_MAX_TOKENS, Flight, not_migratable


@pytest.mark.parametrize("body, reason", [
    ({"prompt": "hi"}, None),
    ({"prompt": [1, 2, 3], "max_tokens": 9, "temperature": 0}, None),
    ({"prompt": "hi", "n": 2}, "n or best_of"),
    ({"prompt": "hi", "echo": True}, "echo"),
    ({"prompt": "hi", "stop": ["\n"]}, "stop strings"),
    ({"prompt": "hi", "logprobs": 1}, "logprobs"),
    ({"prompt": ["a", "b"]}, "several prompts"),
])
def test_which_requests_can_move(body, reason):
    got = not_migratable(body)
    assert (got is None) if reason is None else (reason in got)


def _flight(tmp_path, body):
    engine = Engine(ModelSpec(name="m", checkpoint="/m"), tmp_path, ServerSpec(name="a", budget=1))
    return Flight(body, engine)


def test_the_continuation_sends_every_token_so_far_and_asks_for_the_rest(tmp_path):
    flight = _flight(tmp_path, {"model": "m", "prompt": "hello", "max_tokens": 10, "min_tokens": 4,
                                "temperature": 0, "stream": True, "ignore_eos": True})
    flight.prompt_ids, flight.out_ids = [7, 8, 9], [1, 2, 3]
    body = flight.continuation()
    assert body["prompt"] == [7, 8, 9, 1, 2, 3] and body["max_tokens"] == 7 and body["min_tokens"] == 1
    assert body["return_token_ids"] and body["ignore_eos"] and body["stream"] and body["temperature"] == 0
    assert flight.upstream_body()["return_token_ids"] and "return_token_ids" not in flight.body
    default = _flight(tmp_path, {"prompt": "x"})
    default.prompt_ids, default.out_ids = [1], [2, 3]
    assert default.continuation()["max_tokens"] == DEFAULT_MAX_TOKENS - 2


def test_chunks_keep_the_first_id_and_token_ids_only_when_asked(tmp_path):
    flight = _flight(tmp_path, {"prompt": "x"})
    first = json.loads(flight.outgoing({"id": "cmpl-1", "created": 5, "choices": [
        {"text": "a", "token_ids": [4], "prompt_token_ids": [1, 2]}]}, source=True)[6:])
    later = json.loads(flight.outgoing({"id": "cmpl-2", "created": 9, "choices": [
        {"text": "b", "token_ids": [5], "prompt_token_ids": [1, 2, 4]}]}, source=False)[6:])
    assert (first["id"], later["id"], later["created"]) == ("cmpl-1", "cmpl-1", 5)
    assert "token_ids" not in later["choices"][0] and "prompt_token_ids" not in first["choices"][0]
    asked = _flight(tmp_path, {"prompt": "x", "return_token_ids": True})
    asked.prompt_ids, asked.out_ids = [1, 2], [4, 5]
    src = json.loads(asked.outgoing({"id": "c", "choices": [{"token_ids": [4], "prompt_token_ids": [1, 2]}]},
                                    source=True)[6:])
    dst = json.loads(asked.outgoing({"id": "d", "choices": [{"token_ids": [5], "prompt_token_ids": [1, 2, 4]}],
                                     "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
                                    source=False)[6:])
    assert src["choices"][0]["prompt_token_ids"] == [1, 2] and "prompt_token_ids" not in dst["choices"][0]
    assert dst["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
