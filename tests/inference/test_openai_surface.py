"""The official `openai` client against the server: top_logprobs are served, and every field that would change the
answer and is not implemented is a 400 naming it (never silently ignored)."""

from __future__ import annotations

import math

import openai
import pytest
from serving_fixtures import API_KEY, MODEL_ID

MESSAGES = [{"role": "user", "content": "Name a prime number."}]


@pytest.fixture(scope="module")
def client(served_app) -> openai.OpenAI:
    _, url = served_app
    return openai.OpenAI(base_url=f"{url}/v1/", api_key=API_KEY, max_retries=0)


def test_chat_top_logprobs_are_the_sampling_distributions_most_likely_tokens(client, served_app):
    served, _ = served_app
    reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=6, temperature=0.7, seed=3,
                                           logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert len(content) == len(reply.model_dump()["choices"][0]["token_ids"])
    for position in content:
        tops = position.top_logprobs
        assert len(tops) == 5 and all(a.logprob >= b.logprob for a, b in zip(tops, tops[1:], strict=False))
        assert sum(math.exp(t.logprob) for t in tops) <= 1 + 1e-4
        assert position.logprob <= tops[0].logprob + 1e-6  # nothing beats the most likely token
        assert position.logprob < tops[-1].logprob - 1e-6 or any(
            abs(t.logprob - position.logprob) < 1e-5 for t in tops)  # the sampled token is listed when in the top 5
    greedy = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=2)
    for position in greedy.choices[0].logprobs.content:  # greedy: the chosen token is the most likely one
        assert position.token == position.top_logprobs[0].token
        assert position.logprob == pytest.approx(position.top_logprobs[0].logprob, abs=1e-6)
    tok = served.engine.tokenizer
    first = greedy.model_dump()["choices"][0]["token_ids"][0]
    assert greedy.choices[0].logprobs.content[0].token == tok.decode([first])


def test_completion_logprobs_k_returns_top_logprobs(client):
    reply = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=4, temperature=0,
                                      logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.top_logprobs) == len(logprobs.tokens) == 4
    for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(lp, abs=1e-6) and token in top


@pytest.mark.parametrize(("field", "value", "route"), [
    ("response_format", {"type": "json_object"}, "chat"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}, "chat"),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], "chat"),
    ("tool_choice", "required", "chat"),
    ("logit_bias", {"42": 100}, "chat"),
    ("presence_penalty", 1.0, "chat"),
    ("frequency_penalty", 0.5, "completions"),
    ("echo", True, "completions"),
    ("suffix", "!", "completions"),
    ("best_of", 3, "completions"),
])
def test_unsupported_fields_are_a_400_naming_the_field(client, field, value, route):
    with pytest.raises(openai.BadRequestError) as err:
        if route == "chat":
            client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2, **{field: value})
        else:
            client.completions.create(model=MODEL_ID, prompt="hi", max_tokens=2, **{field: value})
    assert err.value.status_code == 400 and err.value.body["param"] == field and field in err.value.message


def test_fields_at_their_no_op_values_are_accepted(client):
    reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2,
                                           response_format={"type": "text"}, presence_penalty=0)
    assert reply.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2, top_logprobs=2)
