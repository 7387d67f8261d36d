"""router/responses_items.py: input items get ids that a continuation keeps, are listed in OpenAI's item
shapes (the SDK's own models read them), and are paged by limit, order and after; bad queries are 400s
naming the parameter."""

from __future__ import annotations

import pytest
from openai.types.responses import ResponseItemList

from router.errors import ValidationError
from router.responses_items import ItemPage, continued_output, identified, item_resource
from router.responses_params import normalize_input

pytestmark = pytest.mark.timeout(30)

INPUT = [
    {"role": "developer", "content": "Be terse."},
    {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
    {"type": "reasoning", "summary": [{"type": "summary_text", "text": "It is mild."}]},
    {"role": "assistant", "content": "Mild: 18 C."},
]


def items() -> tuple[dict, ...]:
    return identified(normalize_input(INPUT))


def test_items_are_listed_in_openai_shapes() -> None:
    stored = items()
    assert [i["id"].split("_")[0] for i in stored] == ["msg", "msg", "fc", "fco", "rs", "msg"]
    assert len({i["id"] for i in stored}) == len(stored)
    listed = ItemPage(order="asc").of(stored)
    parsed = ResponseItemList.model_validate(listed)  # the SDK's model of the list
    assert [item.type for item in parsed.data] == [
        "message", "message", "function_call", "function_call_output", "reasoning", "message",
    ]  # fmt: skip
    assert listed["data"][0] == {
        "id": stored[0]["id"], "type": "message", "role": "developer",
        "content": [{"type": "input_text", "text": "Be terse."}], "status": "completed",
    }  # fmt: skip
    assert listed["data"][5]["content"] == [{"type": "output_text", "text": "Mild: 18 C.", "annotations": []}]
    assert listed["data"][2]["arguments"] == '{"city":"Oslo"}' and listed["data"][3]["output"] == "18 C"
    assert item_resource(stored[4])["summary"] == [{"type": "summary_text", "text": "It is mild."}]


def test_paging_by_limit_order_and_after() -> None:
    stored = items()
    ids = [i["id"] for i in stored]
    newest = ItemPage(limit=2).of(stored)  # desc by default: the newest first
    assert [i["id"] for i in newest["data"]] == ids[::-1][:2]
    assert newest["first_id"] == ids[-1] and newest["last_id"] == ids[-2] and newest["has_more"]
    rest = ItemPage(limit=10, after=newest["last_id"]).of(stored)
    assert [i["id"] for i in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
    oldest = ItemPage(limit=3, order="asc", after=ids[0]).of(stored)
    assert [i["id"] for i in oldest["data"]] == ids[1:4] and oldest["has_more"]
    end = ItemPage(order="asc", after=ids[-1]).of(stored)
    assert end["data"] == [] and end["first_id"] is None and not end["has_more"]
    with pytest.raises(ValidationError) as error:
        ItemPage(after="msg_nope").of(stored)
    assert error.value.param == "after"


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"order": "newest"}, "order"),
        ({"after": ""}, "after"),
        ({"include[]": "message.output_text.logprobs"}, "include"),
        ({"before": "msg_1"}, "before"),
    ],
)
def test_bad_queries_name_the_parameter(query: dict[str, str], param: str) -> None:
    with pytest.raises(ValidationError) as error:
        ItemPage.from_query(query)
    assert error.value.param == param


def test_query_defaults_and_values() -> None:
    assert ItemPage.from_query({}) == ItemPage(20, "desc", None)
    assert ItemPage.from_query({"limit": "100", "order": "asc", "after": "fc_1"}) == ItemPage(
        100, "asc", "fc_1"
    )


def test_a_continuation_keeps_the_output_items_ids() -> None:
    response = {
        "output": [
            {"id": "rs_1", "type": "reasoning", "summary": []},
            {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "Hi.", "annotations": []}]},
            {"id": "fc_1", "type": "function_call", "call_id": "call_9", "name": "f", "arguments": "{}",
             "status": "completed"},
        ]
    }  # fmt: skip
    items = continued_output(response)
    assert [i["id"] for i in items] == ["rs_1", "msg_1", "fc_1"]
    assert items[1] == {"id": "msg_1", "type": "message", "role": "assistant", "content": "Hi."}
