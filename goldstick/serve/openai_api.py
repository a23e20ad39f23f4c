"""The OpenAI API's shapes: request bodies (validated strictly) and response bodies, for ``goldstick serve``.

Completions (``/v1/completions``, OpenAI's legacy endpoint as vLLM serves it): ``prompt`` is a string, a list of
strings, a list of token ids or a list of lists of token ids (one choice per prompt; a token-id prompt is used as
given, a string gets bos in front). ``logprobs: N`` (0..20) gives each choice
``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` for its generated tokens: the token's text, its
log-probability, ``{text: logprob}`` of the N most likely tokens and the chosen one (so up to N + 1 entries; tokens
whose texts coincide keep the likelier), and the token's character offset in the choice's text. With
``echo: true`` the text starts with the prompt and, with ``logprobs``, the prompt's tokens come first, the first
with ``null`` (nothing precedes it); ``max_tokens: 0`` then only scores the prompt.

Chat (``/v1/chat/completions``): ``messages`` rendered with the model's chat template; the reply in
``choices[0].message``; ``logprobs: true`` (with ``top_logprobs``: 0..20) gives ``choices[0].logprobs.content``.

Log-probabilities are ``generate.py``'s: the full-vocabulary log-softmax of the raw logits, in float64.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from goldstick.serve.generate import MAX_LOGPROBS, Completion, Generator, SamplingParams

MAX_PROMPTS = 16                   # prompts per request (one left-padded batch)
STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)  # "32" is no integer, true no number

TokenIds = Annotated[list[int], Field(min_length=1)]


# ------------------------------------------------------------------------------------------------ requests
class SamplingFields(BaseModel):
    """What completions and chat requests share; unknown OpenAI fields (user, suffix, ...) are ignored."""

    model_config = STRICT
    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = 1.0
    top_k: Annotated[int, Field(ge=-1)] | None = -1
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] | None = 1.0
    seed: Annotated[int, Field(ge=0, lt=2 ** 63)] | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = 1
    stream: bool | None = False
    ignore_eos: bool | None = False

    def sampling(self, max_tokens: int, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed, stop=stop, ignore_eos=bool(self.ignore_eos), logprobs=logprobs,
            prompt_logprobs=prompt_logprobs)


class CompletionRequest(SamplingFields):
    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0)] | None = None

    def prompts(self) -> tuple[list[str], list[list[int]]]:
        """(text prompts, token-id prompts): one of the two is empty."""
        p = self.prompt
        if isinstance(p, str):
            return [p], []
        if isinstance(p[0], str):
            return list(p), []
        if isinstance(p[0], int):
            return [], [list(p)]
        return [], [list(ids) for ids in p]


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_calls, ... reach the template
    role: str
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # text parts, one after the other (vLLM joins them with newlines)
            message["content"] = "\n".join(part.text for part in self.content)
        return message


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0)] | None = None


def logprobs_error(value: int | None) -> str | None:
    """vLLM's refusal of more top log-probabilities than it keeps."""
    if value is not None and value > MAX_LOGPROBS:
        return f"requested {value} log-probabilities per token, more than the maximum of {MAX_LOGPROBS}"
    return None


# ------------------------------------------------------------------------------------------------ responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(model_id: str, choices: list[dict], completions: list[Completion]) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_id, "choices": choices,
            "usage": usage(sum(len(c.prompt_ids) for c in completions), sum(len(c.token_ids) for c in completions))}


def completion_choice(generator: Generator, index: int, c: Completion, prompt_text: str, echo: bool,
                      logprobs: bool) -> dict:
    text = prompt_text + c.text if echo else c.text
    return {"text": text, "index": index,
            "logprobs": legacy_logprobs(generator, c, echo) if logprobs else None,
            "finish_reason": c.finish_reason}


def legacy_logprobs(generator: Generator, c: Completion, echo: bool) -> dict:
    """OpenAI's legacy ``logprobs`` object for one choice (the prompt's tokens first with ``echo``)."""
    ids = c.prompt_ids + c.token_ids if echo else list(c.token_ids)
    values = (c.prompt_logprobs if echo else []) + c.logprobs
    tops = (c.prompt_top_logprobs if echo else []) + c.top_logprobs
    texts = [generator.token_text(t) for t in ids]
    top_dicts = []
    for token_text, value, top in zip(texts, values, tops):
        if top is None:
            top_dicts.append(None)
            continue
        entries = {}
        for token, logprob in top:  # best first: a later token with the same text does not replace it
            entries.setdefault(generator.token_text(token), logprob)
        entries.setdefault(token_text, value)
        top_dicts.append(entries)
    return {"tokens": texts, "token_logprobs": values, "top_logprobs": top_dicts,
            "text_offset": generator.text_offsets(ids)}


def chat_response(model_id: str, c: Completion, logprobs: bool, generator: Generator) -> dict:
    content = None
    if logprobs:
        def entry(token: int, logprob: float) -> dict:
            text = generator.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = {"content": [entry(t, lp) | {"top_logprobs": [entry(i, v) for i, v in top]}
                               for t, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs)]}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": content,
                         "finish_reason": c.finish_reason}],
            "usage": usage(len(c.prompt_ids), len(c.token_ids))}
