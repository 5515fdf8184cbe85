"""Logprobs in the shapes clients expect: OpenAI's completions and chat formats, vLLM's prompt_logprobs."""

from __future__ import annotations

import math
from typing import Any, Sequence

from jaxinfer.outputs import CompletionOutput, Logprob, RequestOutput

# JSON has no -inf; vLLM reports impossible tokens with this floor instead.
LOGPROB_FLOOR = -9999.0


class LogprobFormatter:
    """Formats the engine's logprobs (per token, a dict token id -> Logprob) for one request.

    Args:
      tokenizer: renders token ids as text (None: ids are shown as "token_id:N").
      as_token_ids: show tokens as "token_id:N" even with a tokenizer (vLLM's
        `return_tokens_as_token_ids`, for clients that need the ids).
    """

    def __init__(self, tokenizer, as_token_ids: bool = False):
        self.tokenizer = tokenizer
        self.as_token_ids = as_token_ids or tokenizer is None

    def token_text(self, token_id: int) -> str:
        if self.as_token_ids:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(self, token_ids: Sequence[int], entries: Sequence[dict[int, Logprob] | None],
                            offset: int) -> tuple[dict[str, Any], int]:
        """OpenAI completions logprobs for `token_ids` with their engine entries (token id ->
        Logprob; None for a prompt's first token, which has none), text offsets counted from
        `offset`. Returns the object and the offset after the last token."""
        tokens, token_logprobs, top, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            text = self.token_text(token_id)
            tokens.append(text)
            token_logprobs.append(None if entry is None else _logprob_of(entry, token_id))
            top.append(None if entry is None else {self.token_text(t): _finite(lp.logprob) for t, lp in entry.items()})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
                "text_offset": offsets}, offset

    def prompt_logprobs(self, out: RequestOutput, top_n: int) -> list[dict[str, dict[str, Any]] | None] | None:
        """vLLM's `prompt_logprobs`: per prompt token, None for the first, else token id (as a
        string) -> logprob, rank (exact, for the prompt token too) and text, the prompt token
        first, then the top `top_n`."""
        if out.prompt_logprobs is None:
            return None
        return [None if entry is None else
                {str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": self.token_text(t)}
                 for t, lp in entry.items()}
                for entry in out.prompt_logprobs]

    def chat_logprobs(self, c: CompletionOutput, top_n: int) -> dict[str, Any]:
        """OpenAI chat logprobs ({"content": [...]}) for the tokens of `c`, `top_n` alternatives each."""
        content = []
        for token_id, entry in zip(c.token_ids, c.logprobs or []):
            ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:top_n]
            content.append({**self._chat_token(token_id, _logprob_of(entry, token_id)),
                            "top_logprobs": [self._chat_token(t, lp.logprob) for t, lp in ranked]})
        return {"content": content}

    def _chat_token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}


def _logprob_of(entry: dict[int, Logprob], token_id: int) -> float:
    lp = entry.get(token_id)
    return LOGPROB_FLOOR if lp is None else _finite(lp.logprob)


def _finite(logprob: float) -> float:
    return max(float(logprob), LOGPROB_FLOOR) if not math.isnan(logprob) else LOGPROB_FLOOR
