"""Structured output requests: OpenAI's `response_format` and vLLM's `guided_*` and
`structured_outputs` fields, turned into one `StructuredOutputsParams` for the engine.

A request may carry at most one constraint; two (say `response_format` and `guided_regex`) are a
400 that names both, rather than a silent choice between them. A `structured_outputs` object with
options only (`disable_any_whitespace`) modifies the constraint another field sets, as in vLLM.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxinfer.sampling_params import StructuredOutputsParams
from jaxinfer.server.errors import bad_request


def _schema(value: Any, param: str) -> dict[str, Any]:
    """A JSON schema given as an object or as its JSON text; the engine takes the object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise bad_request(f"{param}: is not valid JSON ({e})", param) from None
    if not isinstance(value, dict):
        raise bad_request(f"{param}: a JSON schema must be a JSON object", param)
    return value


def _requested(req) -> list[tuple[str, dict[str, Any]]]:
    """(field name, StructuredOutputsParams arguments) for each constraint the request sets."""
    found = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
        if schema is None:
            raise bad_request("response_format: type 'json_schema' needs json_schema.schema", "response_format")
        found.append(("response_format", {"json": _schema(schema, "response_format")}))
    elif fmt is not None and fmt.type == "structural_tag":
        if not fmt.structures or not fmt.triggers:
            raise bad_request("response_format: type 'structural_tag' needs structures and triggers", "response_format")
        tag = {"structures": [s.model_dump(by_alias=True, exclude_none=True) for s in fmt.structures],
               "triggers": fmt.triggers}
        found.append(("response_format", {"structural_tag": json.dumps(tag)}))
    if req.guided_json is not None:
        found.append(("guided_json", {"json": _schema(req.guided_json, "guided_json")}))
    if req.guided_regex is not None:
        found.append(("guided_regex", {"regex": req.guided_regex}))
    if req.guided_choice is not None:
        found.append(("guided_choice", {"choice": req.guided_choice}))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", {"grammar": req.guided_grammar}))
    if req.structured_outputs is not None and not _options_only(req.structured_outputs):
        fields = req.structured_outputs.model_dump(exclude_none=True)
        if "json" in fields:
            fields["json"] = _schema(fields["json"], "structured_outputs.json")
        found.append(("structured_outputs", fields))
    return found


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _options_only(so) -> bool:
    """`structured_outputs` that sets options (disable_any_whitespace) but no constraint: as in
    vLLM, the options apply to the constraint another field sets (e.g. response_format)."""
    fields = so.model_dump(exclude_none=True)
    return not any(fields.get(name) not in (None, False) for name in _CONSTRAINTS)


def structured_outputs(req, tool_constraint: StructuredOutputsParams | None = None
                       ) -> StructuredOutputsParams | None:
    """The request's output constraint, or None.

    Args:
      req: a request with the `SamplingFields` structured output fields.
      tool_constraint: the constraint a forced tool choice needs (`tool_choice` "required" or a
        named function); it counts as one more constraint.
    Raises:
      OpenAIError: 400 when more than one constraint is set or one is malformed.
    """
    found = _requested(req)
    if tool_constraint is not None:
        found.append(("tool_choice", {}))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise bad_request(f"only one structured output constraint can be set per request, got {names}",
                          found[-1][0])
    options = {}
    if req.structured_outputs is not None and _options_only(req.structured_outputs):
        options = {"disable_any_whitespace": req.structured_outputs.disable_any_whitespace}
        if not found and tool_constraint is None:
            found.append(("structured_outputs", options))  # nothing to apply them to: the 400 below
    if tool_constraint is not None:
        return dataclasses.replace(tool_constraint, **options) if options else tool_constraint
    if not found:
        return None
    name, fields = found[0]
    fields = {**fields, **options}
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as e:
        message = str(e) if name == "structured_outputs" else f"{name}: {e}"
        raise bad_request(message, name) from None
