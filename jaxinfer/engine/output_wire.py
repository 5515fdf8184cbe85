"""A compact form for each step's outputs on their way from the engine process to the front.

A streamed request's `RequestOutput` repeats, at every step, what the front already has: the
prompt and its token ids, and the request's metrics with every output token's time so far
(which grows with the output: quadratic bytes over a request). Pickled as dataclasses, 256
streams' outputs were ~145 KB a step and took 7 ms to pickle and 12.6 ms to unpickle on a
2-core CPU, on the critical path of both processes. The encoder sends each request's prompt
once and only the token times added since its last message, as plain tuples; the decoder
keeps what was sent and rebuilds equal `RequestOutput`s (one metrics object per request,
updated in place, as the engine's own is). State is dropped when a request finishes or is
aborted on either side.
"""

from __future__ import annotations

import dataclasses

from jaxinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput

# Every RequestMetrics field but the growing token_times, which goes as what was added.
METRIC_SCALARS = tuple(f.name for f in dataclasses.fields(RequestMetrics) if f.name != "token_times")


class OutputEncoder:
    """The engine process's side: RequestOutputs -> tuples (see the module doc)."""

    def __init__(self):
        self._times_sent: dict[str, int] = {}  # request id -> token times already sent

    def encode(self, outputs: list[RequestOutput]) -> list[tuple]:
        return [self._encode(out) for out in outputs]

    def forget(self, request_id: str) -> None:
        """The request was aborted: no more messages for it."""
        self._times_sent.pop(request_id, None)

    def _encode(self, out: RequestOutput) -> tuple:
        rid = out.request_id
        sent = self._times_sent.get(rid)
        prompt = (out.prompt, out.prompt_token_ids) if sent is None else None
        m = out.metrics
        metrics = None
        if m is not None:
            metrics = (*(getattr(m, f) for f in METRIC_SCALARS), m.token_times[sent or 0:])
        if out.finished:
            self._times_sent.pop(rid, None)
        else:
            self._times_sent[rid] = 0 if m is None else len(m.token_times)
        completions = [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs,
                        c.cumulative_logprob) for c in out.outputs]
        return rid, prompt, completions, out.finished, out.prompt_logprobs, metrics, out.extra or None


class OutputDecoder:
    """The front's side: tuples -> RequestOutputs equal to the engine's."""

    def __init__(self):
        self._requests: dict[str, tuple] = {}  # request id -> (prompt, prompt ids, metrics or None)

    def decode(self, messages: list[tuple]) -> list[RequestOutput]:
        return [self._decode(msg) for msg in messages]

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._requests)

    def _decode(self, msg: tuple) -> RequestOutput:
        rid, prompt, completions, finished, prompt_logprobs, metrics, extra = msg
        if prompt is not None:
            known = (*prompt, None)
        else:
            known = self._requests.get(rid)
            if known is None:
                raise RuntimeError(f"an output of request {rid!r} arrived before its first one")
        text, ids, m = known
        if metrics is not None:
            *scalars, new_times = metrics
            if m is None:
                m = RequestMetrics(**dict(zip(METRIC_SCALARS, scalars)), token_times=list(new_times))
            else:
                for field, value in zip(METRIC_SCALARS, scalars):
                    setattr(m, field, value)
                m.token_times.extend(new_times)
        if finished:
            self._requests.pop(rid, None)
        else:
            self._requests[rid] = (text, ids, m)
        return RequestOutput(rid, text, ids, [CompletionOutput(*c) for c in completions], finished, prompt_logprobs,
                             m, extra or {})
