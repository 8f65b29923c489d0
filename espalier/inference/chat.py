"""Chat messages -> the exact prompt token ids that the engine samples from.

One tokenizer and one chat template, used by the server for sampling and by the GRPO job
for Arbor-style batch items that carry messages instead of token ids, so both see the same
tokens.

Departures from Arbor:
1. The template is applied once, here; Arbor's trainer re-renders the conversation with
   another adapter and trains on text the policy never saw.
2. `continue_final_message=True` (vLLM's extension) treats the last message as an
   assistant prefix to continue, e.g. a prefilled output-field header.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "developer", "tool")


def check_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode (JSON can carry a lone surrogate, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode ({e.reason} at position {e.start})") from e
    return text


def flatten_content(content: Any) -> str:
    """OpenAI content may be a string or a list of parts; only text parts are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return check_text(content, "message content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text", ""), str):
                raise ValueError("only text content parts ({'type': 'text', 'text': '...'}) are supported")
            texts.append(check_text(part.get("text", ""), "message content"))
        return "".join(texts)
    raise ValueError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"each message must be an object with a 'role' among {ROLES}")
        out.append({"role": m["role"], "content": flatten_content(m.get("content"))})
    return out


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], continue_final_message: bool = False
) -> str:
    if continue_final_message and messages[-1]["role"] != "assistant":
        raise ValueError("continue_final_message needs the last message to be an assistant message")
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=not continue_final_message,
        continue_final_message=continue_final_message,
    )


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], continue_final_message: bool = False
) -> list[int]:
    """The templated prompt's token ids (the template carries its own special tokens)."""
    text = render_prompt(tokenizer, messages, continue_final_message)
    return tokenizer.encode(text, add_special_tokens=False)


def completion_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of an assistant reply given as text, ended by the template's end-of-turn token.

    Only for Arbor-style items without token ids: the ids an engine sampled are always
    preferred, since re-tokenising text need not give back the sampled ids.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids
