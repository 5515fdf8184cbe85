"""POST /tokenize and /detokenize, as vLLM serves them: a prompt or a conversation in, its token
ids, their count and the context length out; token ids in, their text out."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field, model_validator

from jaxinfer.server.chat import render_messages
from jaxinfer.server.errors import bad_request
from jaxinfer.server.protocol import ChatMessage, StrictModel, TokenIds, Tool
from jaxinfer.server.serving import Serving

router = APIRouter()


class TokenizeRequest(StrictModel):
    """Either `prompt` (text) or `messages` (rendered by the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(None, description="default: true for a prompt, false for messages "
                                                              "(the template writes them)")
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt or messages")
        return self


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: TokenIds


def _tokenize(serving: Serving, body: TokenizeRequest) -> list[int]:
    tok = serving.info.tokenizer
    if tok is None:
        raise bad_request("this model has no tokenizer", "prompt")
    if body.prompt is not None:
        return tok.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    text, ids = render_messages(serving, [m.as_template_dict() for m in body.messages], tools=tools,
                                add_generation_prompt=body.add_generation_prompt,
                                template_kwargs=body.chat_template_kwargs)
    return tok.encode(text, add_special_tokens=True) if body.add_special_tokens else ids


@router.post("/tokenize", tags=["vLLM"])
async def tokenize(body: TokenizeRequest, request: Request):
    serving: Serving = request.app.state.serving
    serving.resolve_model(body.model)
    ids = await asyncio.to_thread(_tokenize, serving, body)
    strs = serving.info.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": serving.info.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize", tags=["vLLM"])
async def detokenize(body: DetokenizeRequest, request: Request):
    serving: Serving = request.app.state.serving
    serving.resolve_model(body.model)
    serving.check_token_ids(body.tokens, "tokens")
    tok = serving.info.tokenizer
    if tok is None:
        raise bad_request("this model has no tokenizer", "tokens")
    return {"prompt": await asyncio.to_thread(tok.decode, body.tokens, skip_special_tokens=False)}
