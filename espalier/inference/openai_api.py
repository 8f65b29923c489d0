"""OpenAI request bodies -> `GenerateRequest`, and engine output -> OpenAI response bodies.

Pure functions, so every validation rule is testable without a server. A bad value raises
`BadRequest` (-> HTTP 400) naming the parameter and the allowed range.

Departures from OpenAI / Arbor:
1. Responses carry `prompt_token_ids` (top level) and `token_ids` on each choice, as vLLM
   does with `return_token_ids`: the ids the engine actually sampled.
2. `top_k`, `repetition_penalty`, `seed` and chat `continue_final_message` are accepted
   (vLLM's extensions); streaming is refused with a 400 rather than ignored.
3. A field that would change what the caller gets and that Espalier does not implement
   (`response_format` other than text, `tools`, `tool_choice`, `functions`, `echo`, `suffix`,
   `logit_bias`, penalties, `best_of` > 1, ...) is a 400 naming it (`refuse_unsupported`),
   never silently ignored. `top_logprobs` (chat) and `logprobs: k` (completions) are served.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from espalier.inference.chat import check_text
from espalier.inference.engine import GeneratedSequence, GenerateRequest


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


INT64 = 2**63


def _number(body: dict[str, Any], name: str, default: float | None, kind: type) -> Any:
    """A finite number (an integer within int64 when `kind` is int); anything else is a 400 naming `name`."""
    value = body.get(name)
    if value is None:
        return default
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be {what}, got {value!r}", name)
    if isinstance(value, int) and not -INT64 <= value < INT64:  # before isfinite, which overflows on huge ints
        raise BadRequest(f"{name} must be {what} within 64 bits, got {value!r}"[:300], name)
    if not math.isfinite(value) or (kind is int and (int(value) != value or not -INT64 <= value < INT64)):
        raise BadRequest(f"{name} must be a finite {what.split()[-1]} within 64 bits, got {value!r}", name)
    return kind(value)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise BadRequest("stop must be a string or a list of strings", "stop")


MAX_TOP_LOGPROBS = 20
# Sampling values whose fp32 arithmetic stays finite (logits / temperature, logits * penalty): a value
# outside them would turn a row's probabilities into inf/nan.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 100.0
MAX_PENALTY = 100.0

# field -> (the value(s) that change nothing, what to do instead): anything else is a 400 naming the field.
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "response_format": ((None, {"type": "text"}), "structured output is not implemented; parse the text "
                        "(DSPy: ChatAdapter, or JSONAdapter without response_format)"),
    "tools": ((None, []), "tool calling is not implemented"),
    "tool_choice": ((None, "none"), "tool calling is not implemented"),
    "functions": ((None, []), "function calling is not implemented"),
    "function_call": ((None, "none"), "function calling is not implemented"),
    "parallel_tool_calls": ((None, False), "tool calling is not implemented"),
    "echo": ((None, False), "echo is not implemented; the response's prompt_token_ids carry the prompt"),
    "suffix": ((None, ""), "suffix (insertion) is not implemented"),
    "logit_bias": ((None, {}), "logit_bias is not implemented"),
    "presence_penalty": ((None, 0, 0.0), "use repetition_penalty (vLLM's) instead"),
    "frequency_penalty": ((None, 0, 0.0), "use repetition_penalty (vLLM's) instead"),
    "best_of": ((None, 1), "best_of is not implemented; send n and pick"),
    "modalities": ((None, ["text"]), "only text output"),
    "audio": ((None,), "only text output"),
    "prediction": ((None,), "predicted outputs are not implemented"),
    "guided_json": ((None,), "guided decoding is not implemented"),
    "guided_regex": ((None,), "guided decoding is not implemented"),
    "guided_choice": ((None,), "guided decoding is not implemented"),
    "guided_grammar": ((None,), "guided decoding is not implemented"),
}


def refuse_unsupported(body: dict[str, Any]) -> None:
    """A 400 naming the first field that would change the answer and that Espalier does not implement."""
    for name, (harmless, advice) in _UNSUPPORTED.items():
        if name in body and not any(body[name] == ok and type(body[name]) is type(ok) for ok in harmless):
            raise BadRequest(f"{name}={body[name]!r} is not supported by this server: {advice}", name)


def chat_top_logprobs(body: dict[str, Any]) -> int:
    """Chat's `top_logprobs` (needs `logprobs: true`, as OpenAI requires)."""
    if body.get("logprobs") not in (None, True, False):
        raise BadRequest(f"logprobs must be true or false, got {body['logprobs']!r}", "logprobs")
    k = _number(body, "top_logprobs", 0, int)
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}", "top_logprobs")
    if k and not body.get("logprobs"):
        raise BadRequest("top_logprobs needs logprobs=true", "top_logprobs")
    return k


def completion_top_logprobs(body: dict[str, Any]) -> int:
    """Completions' `logprobs: k`: the k most likely tokens at each position (0: the sampled token's only)."""
    value = body.get("logprobs")
    if value is None or value is False:
        return 0
    k = 0 if value is True else _number(body, "logprobs", 0, int)
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}", "logprobs")
    return k


def sampling_request(
    body: dict[str, Any], prompt: list[int], adapter: str | None, max_model_len: int, top_logprobs: int = 0
) -> GenerateRequest:
    """Validate the sampling fields of a chat or completion body against the model's context."""
    if body.get("stream"):
        raise BadRequest("streaming is not supported; send stream=false", "stream")
    refuse_unsupported(body)
    room = max_model_len - len(prompt)
    if room < 1:
        raise BadRequest(f"the prompt has {len(prompt)} tokens; the model's context is {max_model_len}", "messages")
    max_tokens = _number(body, "max_tokens", None, int)
    max_tokens = _number(body, "max_completion_tokens", max_tokens, int)
    max_tokens = room if max_tokens is None else max_tokens
    if max_tokens < 1 or max_tokens > room:
        raise BadRequest(
            f"max_tokens={max_tokens} is impossible: the prompt has {len(prompt)} tokens and the context is "
            f"{max_model_len}, so at most {room} can be generated",
            "max_tokens",
        )
    temperature = _number(body, "temperature", 1.0, float)
    top_p = _number(body, "top_p", 1.0, float)
    top_k = _number(body, "top_k", -1, int)
    penalty = _number(body, "repetition_penalty", 1.0, float)
    n = _number(body, "n", 1, int)
    checks = [
        (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE, "temperature",
         f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {temperature}"),
        (0 < top_p <= 1, "top_p", f"top_p must be in (0, 1], got {top_p}"),
        (-1 <= top_k < 2**31, "top_k", f"top_k must be -1 (off) or in [0, 2**31), got {top_k}"),
        (1 / MAX_PENALTY <= penalty <= MAX_PENALTY, "repetition_penalty",
         f"repetition_penalty must be in [{1 / MAX_PENALTY}, {MAX_PENALTY}] (1 = off), got {penalty}"),
        (1 <= n <= 128, "n", f"n must be between 1 and 128, got {n}"),
    ]
    for ok, param, message in checks:
        if not ok:
            raise BadRequest(message, param)
    return GenerateRequest(
        prompt_ids=tuple(prompt),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=penalty,
        n=n,
        stop=_stop(body),
        seed=_number(body, "seed", None, int),
        adapter=adapter,
        logprobs=True,
        top_logprobs=top_logprobs,
    )


def completion_prompt(body: dict[str, Any], tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        try:
            return tokenizer.encode(check_text(prompt, "prompt"), add_special_tokens=False)
        except ValueError as e:
            raise BadRequest(str(e), "prompt") from e
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise BadRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
        return prompt
    raise BadRequest("prompt must be a non-empty string or a non-empty list of token ids (one prompt)", "prompt")


def _usage(prompt: list[int], seqs: list[GeneratedSequence]) -> dict[str, int]:
    completion = sum(len(s.token_ids) for s in seqs)
    return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}


def chat_response(
    model: str, prompt: list[int], seqs: list[GeneratedSequence], tokenizer, want_logprobs: bool
) -> dict[str, Any]:
    choices = []
    for i, s in enumerate(seqs):
        logprobs = None
        if want_logprobs and s.logprobs is not None:
            tops = s.top_logprobs or ((),) * len(s.token_ids)
            content = [
                {**_token(tokenizer, t, lp), "top_logprobs": [_token(tokenizer, c, clp) for c, clp in top]}
                for t, lp, top in zip(s.token_ids, s.logprobs, tops, strict=True)
            ]
            logprobs = {"content": content}
        message = {"role": "assistant", "content": s.text}
        choices.append(
            {"index": i, "message": message, "finish_reason": s.finish_reason, "logprobs": logprobs,
             "token_ids": list(s.token_ids)}
        )
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model, "choices": choices, "usage": _usage(prompt, seqs), "prompt_token_ids": prompt,
    }


def completion_response(
    model: str, prompt: list[int], seqs: list[GeneratedSequence], tokenizer, want_logprobs: bool
) -> dict[str, Any]:
    choices = []
    for i, s in enumerate(seqs):
        logprobs = None
        if want_logprobs and s.logprobs is not None:
            top = None
            if s.top_logprobs is not None:  # OpenAI's shape: one {token: logprob} per position
                top = [{_text(tokenizer, c): clp for c, clp in position} for position in s.top_logprobs]
            logprobs = {"tokens": [_text(tokenizer, t) for t in s.token_ids],
                        "token_logprobs": list(s.logprobs), "top_logprobs": top, "text_offset": None}
        choices.append({"index": i, "text": s.text, "finish_reason": s.finish_reason, "logprobs": logprobs,
                        "token_ids": list(s.token_ids)})
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": model, "choices": choices, "usage": _usage(prompt, seqs), "prompt_token_ids": prompt,
    }


def _text(tokenizer, token_id: int) -> str:
    """A token's text as OpenAI reports it (the decoded piece, not the tokenizer's byte-level symbol)."""
    return tokenizer.decode([token_id])


def _token(tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    text = _text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            409: "conflict_error", 413: "request_too_large"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
