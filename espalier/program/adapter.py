"""Chat adapters that keep a small model inside DSPy's output format.

`PrefillChatAdapter`: the assistant turn starts with the first output field's header.
`FieldwiseChatAdapter`: one LM call per output field, each continuing an assistant turn in
which the adapter itself wrote every header, so the format cannot fail.

A model as small as SmolLM2-135M almost never writes DSPy's `[[ ## field ## ]]` format on its
own (ARCHITECTURE.md section 7: 3 parsable completions in 448), so every reward is the same
format failure and GRPO learns nothing. Prefilling the assistant turn with the first header
(`[[ ## reasoning ## ]]` for ChainOfThought) makes completions parsable from step 0. The
prefill is part of the prompt the server tokenizes, so it is part of the prompt ids the
trainer sees: rollouts, validation and serving all go through this same adapter.

Departures from DSPy's ChatAdapter:
1. The last message is an assistant prefix, sent with `continue_final_message` (vLLM's
   chat extension, implemented by Espalier's server) so the model continues it.
2. `parse` puts the prefix back in front of the continuation before parsing.
3. No JSONAdapter fallback by default: a second, differently formatted call would train
   the model on a prompt the program does not normally send.
"""

from __future__ import annotations

from typing import Any

import dspy
from dspy.adapters.chat_adapter import ChatAdapter


class PrefillChatAdapter(ChatAdapter):
    def __init__(self, use_json_adapter_fallback: bool = False, **kwargs: Any) -> None:
        super().__init__(use_json_adapter_fallback=use_json_adapter_fallback, **kwargs)

    @staticmethod
    def prefix(signature: type[dspy.Signature]) -> str:
        first = next(iter(signature.output_fields))
        return f"[[ ## {first} ## ]]\n"

    def format(self, signature: type[dspy.Signature], demos: list[dict[str, Any]], inputs: dict[str, Any]):
        messages = super().format(signature, demos, inputs)
        return [*messages, {"role": "assistant", "content": self.prefix(signature)}]

    def parse(self, signature: type[dspy.Signature], completion: str) -> dict[str, Any]:
        head = self.prefix(signature).strip()
        if not completion.lstrip().startswith(head):
            completion = f"{head}\n{completion}"
        return super().parse(signature, completion)

    def __call__(self, lm, lm_kwargs, signature, demos, inputs):
        return super().__call__(lm, _continue(lm_kwargs), signature, demos, inputs)

    async def acall(self, lm, lm_kwargs, signature, demos, inputs):
        return await super().acall(lm, _continue(lm_kwargs), signature, demos, inputs)


def _continue(lm_kwargs: dict[str, Any]) -> dict[str, Any]:
    extra = dict(lm_kwargs.get("extra_body") or {})
    extra.update(continue_final_message=True, add_generation_prompt=False)
    return {**lm_kwargs, "extra_body": extra}


class FieldwiseChatAdapter(ChatAdapter):
    """Writes DSPy's field headers itself and samples each field's value with its own LM call.

    For a ChainOfThought predictor (`reasoning`, then the answer field) that is two calls: the
    first continues `[[ ## reasoning ## ]]` and stops at the next header, the second continues
    the reasoning plus `[[ ## answer ## ]]`. SmolLM2-135M cold (ARCHITECTURE.md section 7) writes
    the format almost never, and with only the first header prefilled it still rambles past the
    token limit in the reasoning 83-100% of the time: every run then gets the same format
    failure score and GRPO has nothing to compare. Field by field, every run parses and the
    reward is the metric's. Each call is captured and trained as its own sequence (the
    prompt holds the fields sampled before it); rollouts, validation and serving all use it.

    Departures from DSPy's ChatAdapter:
    1. One call per output field (`n` must be 1); the stop string is the next header's opening.
    2. Field values are parsed by ChatAdapter.parse on the assembled text, so typed fields
       (int, bool, lists) still fail to parse, and score, as format failures.
    """

    STOP = "[[ ##"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(use_json_adapter_fallback=False, **kwargs)

    def __call__(self, lm, lm_kwargs, signature, demos, inputs):
        processed = self._call_preprocess(lm, lm_kwargs, signature, inputs)
        messages = super().format(processed, demos, inputs)
        text = ""
        for name in processed.output_fields:
            text += f"[[ ## {name} ## ]]\n"
            turn = [*messages, {"role": "assistant", "content": text}]
            text += _value(lm(messages=turn, **self._kwargs(lm_kwargs))) + "\n\n"
        return self._call_postprocess(processed, signature, [text + "[[ ## completed ## ]]"], lm, lm_kwargs)

    async def acall(self, lm, lm_kwargs, signature, demos, inputs):
        # One path for both: the field calls depend on each other, so nothing runs concurrently anyway.
        import asyncio

        return await asyncio.to_thread(self.__call__, lm, lm_kwargs, signature, demos, inputs)

    def _kwargs(self, lm_kwargs: dict[str, Any]) -> dict[str, Any]:
        if int(lm_kwargs.get("n", 1) or 1) != 1:
            raise ValueError("FieldwiseChatAdapter samples one completion per call: n must be 1")
        stop = lm_kwargs.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        return _continue({**lm_kwargs, "stop": [*stop, self.STOP]})


def _value(outputs: list[Any]) -> str:
    """The sampled value of one field, cut at a header the model started itself."""
    first = outputs[0]
    text = first.get("text") if isinstance(first, dict) else first
    return (text or "").split(FieldwiseChatAdapter.STOP)[0].strip()
