"""A ChatAdapter whose assistant turn starts with the first output field's header.

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
