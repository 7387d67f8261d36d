"""A stored response's input items, as ``GET /v1/responses/{id}/input_items`` lists them.

Every input item a response keeps (router/responses_store.py) has an ``id``: this request's own items get
new ones when the response is created (``identified``), and the items a continuation takes over from the
response it continues keep theirs (its input items' ids, then its output items' own ids), so that one
item has one id in every response that holds it.

The list is OpenAI's: the whole input the response answered (a continued response's items first), as
item resources (``message`` with ``input_text`` parts, or ``output_text`` parts for the assistant;
``function_call``; ``function_call_output``; ``reasoning``), each ``status: "completed"``, newest first
unless ``order=asc``, ``limit`` (1 to 100, default 20) at a time after the item ``after``, with
``first_id``, ``last_id`` and ``has_more``. Other query parameters are refused (``include``: nothing
extra to include).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ValidationError
from .responses_events import new_id
from .responses_params import normalize_output

# The id prefix of each kind of item, as OpenAI's.
ITEM_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
ORDERS = ("asc", "desc")


def identified(items: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """Normalized input items of a new request, each with a new ``id``."""
    return tuple({"id": new_id(ITEM_PREFIXES[item["type"]]), **item} for item in items)


def continued_output(response: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """A stored response's output items as input items of its continuation, with the output items' ids."""
    output = response["output"]
    return tuple(
        {"id": raw["id"], **item} for raw, item in zip(output, normalize_output(output), strict=True)
    )


def item_resource(item: Mapping[str, Any]) -> dict[str, Any]:
    """A stored input item as OpenAI lists it."""
    kind = item["type"]
    out: dict[str, Any] = {"id": item["id"], "type": kind}
    if kind == "message":
        if item["role"] == "assistant":
            part = {"type": "output_text", "text": item["content"], "annotations": []}
        else:
            part = {"type": "input_text", "text": item["content"]}
        out.update(role=item["role"], content=[part], status="completed")
    elif kind == "reasoning":
        out["summary"] = item["summary"]
    elif kind == "function_call":
        out.update(
            call_id=item["call_id"], name=item["name"], arguments=item["arguments"], status="completed"
        )
    else:
        out.update(call_id=item["call_id"], output=item["output"], status="completed")
    return out


@dataclass(frozen=True)
class ItemPage:
    """What the query asks: ``limit`` items after the one with id ``after`` (None: from the first), in
    ``order``."""

    limit: int = DEFAULT_LIMIT
    order: str = "desc"
    after: str | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> ItemPage:
        """The query parameters; a 400 naming the one that is bad or not supported."""
        unknown = sorted(set(query) - {"limit", "order", "after"})
        if unknown:
            name = unknown[0]
            if name.startswith("include"):
                raise ValidationError("`include` is not supported (nothing extra to include)", "include")
            raise ValidationError(f"query parameter `{name}` is not supported", name)
        limit = DEFAULT_LIMIT
        if "limit" in query:
            raw = query["limit"]
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
                raise ValidationError(
                    f"`limit` must be an integer from 1 to {MAX_LIMIT}. Given: {raw[:20]}", "limit"
                )
            limit = int(raw)
        order = query.get("order", "desc")
        if order not in ORDERS:
            raise ValidationError(f"`order` must be asc or desc. Given: {order[:20]}", "order")
        after = query.get("after")
        if after is not None and not after:
            raise ValidationError("`after` must be an item id", "after")
        return cls(limit, order, after)

    def of(self, items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """The list object of this page of ``items`` (in input order); ``after`` must name one of them."""
        listed = [item_resource(item) for item in items]
        if self.order == "desc":
            listed.reverse()
        start = 0
        if self.after is not None:
            ids = [item["id"] for item in listed]
            if self.after not in ids:
                raise ValidationError(
                    f"`after` names no input item of this response: {self.after[:80]}", "after"
                )
            start = ids.index(self.after) + 1
        page = listed[start : start + self.limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + self.limit < len(listed),
        }
