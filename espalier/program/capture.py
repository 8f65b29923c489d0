"""Capture every LM call of a DSPy program run, with the exact token ids the server sampled.

Each predictor of the rollout copy of the program gets its own `CapturingLM`: a copy of the
user's LM that knows the predictor's name and, when DSPy records the call in its history,
hands the raw server response to the `Recorder` of the run in progress (a context variable,
so concurrent runs in threads never mix).

Departures from DSPy/Arbor:
1. Arbor rebuilds training prompts from the trace with an XML adapter and re-renders the
   completion from parsed fields; here the trainer gets the prompt and completion token ids
   the engine returned for this very call, and their sampling log-probs.
2. A call whose output failed to parse is still captured: it is data with a low reward.
3. DSPy's ChatAdapter retries a failed parse through JSONAdapter (`use_json_adapter_fallback`,
   on by default). That retry is not the predictor's next invocation: its prompt is another
   adapter's, sent only by the runs whose parse failed, so counting it as invocation i + 1
   would group JSON prompts with the ChatAdapter prompts of runs that called the predictor
   again. A retry is recognised (`in_json_fallback`), kept apart in `Recorder.fallbacks`, left
   out of training and counted per step (`rollouts/json_fallback_calls`); the ChatAdapter call
   that failed stays invocation i, with its run's reward.
"""

from __future__ import annotations

import contextvars
import copy
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dspy

from espalier.types import LMCall


class MissingTokenIdsError(RuntimeError):
    """The server's response carried no token ids: it is not an Espalier server."""


@dataclass
class Recorder:
    """The LM calls of one program run, in call order."""

    calls: list[LMCall] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    fallbacks: list[LMCall] = field(default_factory=list)  # JSONAdapter retries of a failed parse, not trained

    def record(self, predictor: str, messages: list[dict[str, Any]], response: Any, fallback: bool = False) -> None:
        if fallback:
            self.fallbacks += [LMCall(predictor, -1, c["prompt_ids"], c["completion_ids"], c["logprobs"],
                                      completion_text=c["text"], truncated=c["truncated"])
                               for c in response_choices(response)]
            return
        for choice in response_choices(response):
            invocation = self.counts[predictor]
            self.counts[predictor] += 1
            self.calls.append(
                LMCall(
                    predictor=predictor,
                    invocation=invocation,
                    prompt_ids=choice["prompt_ids"],
                    completion_ids=choice["completion_ids"],
                    logprobs=choice["logprobs"],
                    messages=tuple({"role": m.get("role", ""), "content": str(m.get("content", ""))} for m in messages),
                    completion_text=choice["text"],
                    truncated=choice["truncated"],
                )
            )


_current: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("espalier_recorder", default=None)


@contextmanager
def recording() -> Iterator[Recorder]:
    """Record the LM calls made in this thread (one program run) into a fresh Recorder."""
    recorder = Recorder()
    token = _current.set(recorder)
    try:
        with dspy.context(disable_history=False):
            yield recorder
    finally:
        _current.reset(token)


class CapturingLM(dspy.LM):
    """The user's LM, labelled with one predictor's name; reports each call to the current Recorder."""

    predictor_name: str = ""

    @classmethod
    def wrap(cls, lm: dspy.LM, predictor_name: str, **overrides: Any) -> CapturingLM:
        base = lm.copy(**overrides) if overrides else copy.copy(lm)
        captured = copy.copy(base)
        captured.__class__ = cls  # same state, one overridden method: no re-construction of the client
        captured.predictor_name = predictor_name
        captured.cache = False  # G runs of one example must be G samples, never one cached answer
        captured.history = []
        return captured

    def update_history(self, entry: dict[str, Any]) -> None:
        recorder = _current.get()
        if recorder is not None:
            recorder.record(self.predictor_name, entry.get("messages") or [], entry.get("response"), in_json_fallback())


def in_json_fallback() -> bool:
    """Whether the LM call in progress is ChatAdapter's JSONAdapter retry of a failed parse.

    DSPy opens one `adapter_fallback_scope` per ChatAdapter call (JSONAdapter is a ChatAdapter),
    so two nested scopes mean the inner call is the retry. DSPy versions without that context
    variable: a JSONAdapter in the call stack under another adapter's call."""
    try:
        from dspy.clients.call_context import _adapter_calls
    except ImportError:
        return _json_adapter_below_another()
    return len(_adapter_calls.get()) > 1


def _json_adapter_below_another() -> bool:
    from dspy.adapters.json_adapter import JSONAdapter

    adapters = [f.f_locals.get("self") for f in _frames() if isinstance(f.f_locals.get("self"), dspy.Adapter)]
    return any(isinstance(a, JSONAdapter) for a in adapters) and not all(isinstance(a, JSONAdapter) for a in adapters)


def _frames():
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        yield frame
        frame = frame.f_back


def _as_dict(response: Any) -> dict[str, Any]:
    if isinstance(response, list | tuple):
        response = response[0] if response else {}
    if isinstance(response, dict):
        return response
    if getattr(response, "provider_data", None):  # DSPy's lm15 engine keeps the raw JSON here
        return dict(response.provider_data)
    if hasattr(response, "model_dump"):  # LiteLLM's ModelResponse keeps unknown fields
        return response.model_dump()
    raise MissingTokenIdsError(f"cannot read an LM response of type {type(response).__name__}")


def response_choices(response: Any) -> list[dict[str, Any]]:
    """Token ids, log-probs and text of each choice of an OpenAI-shaped response from an Espalier server."""
    data = _as_dict(response)
    prompt_ids = data.get("prompt_token_ids")
    choices = data.get("choices") or []
    if prompt_ids is None or any(c.get("token_ids") is None for c in choices):
        raise MissingTokenIdsError(
            "the server's response carries no prompt_token_ids/token_ids. Training needs the exact sampled tokens: "
            "point the LM's api_base at an Espalier server (espalier.init()['base_url'])."
        )
    return [_choice(c, tuple(prompt_ids)) for c in choices]


def _choice(choice: dict[str, Any], prompt_ids: tuple[int, ...]) -> dict[str, Any]:
    completion_ids = tuple(choice["token_ids"])
    content = ((choice.get("logprobs") or {}).get("content")) or None
    logprobs = tuple(float(t["logprob"]) for t in content) if content else None
    if logprobs is not None and len(logprobs) != len(completion_ids):
        logprobs = None  # a server that reports log-probs per text piece, not per token: recompute instead
    message = choice.get("message") or {}
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "logprobs": logprobs,
        "text": message.get("content") or choice.get("text") or "",
        "truncated": choice.get("finish_reason") == "length",
    }
