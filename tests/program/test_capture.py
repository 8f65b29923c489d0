"""Reading exact token ids out of both DSPy engines' responses, and refusing a server without them."""

import pytest

from espalier.program.capture import MissingTokenIdsError, Recorder, response_choices

RAW = {
    "prompt_token_ids": [1, 2, 3],
    "choices": [
        {
            "message": {"role": "assistant", "content": "hi there"},
            "token_ids": [7, 8],
            "logprobs": {"content": [{"token": "hi", "logprob": -0.5}, {"token": " there", "logprob": -1.25}]},
        }
    ],
}


class _Lm15Response:  # DSPy's lm15 engine keeps the raw JSON in provider_data
    provider_data = RAW


class _LiteLLMResponse:  # LiteLLM's ModelResponse keeps unknown fields in model_dump()
    def model_dump(self):
        return RAW


@pytest.mark.parametrize("response", [RAW, _Lm15Response(), _LiteLLMResponse(), [_Lm15Response()]])
def test_token_ids_and_logprobs_are_read_from_every_response_shape(response):
    (choice,) = response_choices(response)
    assert choice["prompt_ids"] == (1, 2, 3)
    assert choice["completion_ids"] == (7, 8)
    assert choice["logprobs"] == (-0.5, -1.25)
    assert choice["text"] == "hi there"


def test_logprobs_not_per_token_are_dropped_not_misaligned():
    raw = {**RAW, "choices": [{**RAW["choices"][0], "logprobs": {"content": [{"token": "x", "logprob": -1.0}]}}]}
    assert response_choices(raw)[0]["logprobs"] is None


def test_a_server_without_token_ids_is_refused_with_the_fix():
    with pytest.raises(MissingTokenIdsError, match="espalier.init"):
        response_choices({"choices": [{"message": {"content": "x"}}]})


def test_recorder_counts_invocations_per_predictor():
    rec = Recorder()
    for name in ["a", "b", "a"]:
        rec.record(name, [{"role": "user", "content": "q"}], RAW)
    assert [(c.predictor, c.invocation) for c in rec.calls] == [("a", 0), ("b", 0), ("a", 1)]
    assert rec.calls[0].messages == ({"role": "user", "content": "q"},)


def test_a_call_cut_at_the_token_limit_is_marked_truncated():
    cut = {**RAW, "choices": [{**RAW["choices"][0], "finish_reason": "length"}]}
    rec = Recorder()
    rec.record("a", [], cut)
    rec.record("a", [], {**RAW, "choices": [{**RAW["choices"][0], "finish_reason": "stop"}]})
    assert [c.truncated for c in rec.calls] == [True, False]
