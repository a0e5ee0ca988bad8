"""Merge patch (RFC 7386) and JSON patch (RFC 6902) as the API applies them, and the
field check behind fieldValidation=Strict."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from builder.server.patch import PatchError, json_patch, merge_patch, unknown_fields


@pytest.mark.parametrize(("target", "patch", "result"), [  # RFC 7386, appendix A
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
])
def test_merge_patch_follows_rfc_7386(target: Any, patch: Any, result: Any) -> None:
    before = copy.deepcopy(target)
    assert merge_patch(target, patch) == result
    assert target == before  # inputs untouched


DOC = {"spec": {"images": ["a", "b"], "imageCacheSize": 20}, "metadata": {"annotations": {"x/y": "1"}}}


@pytest.mark.parametrize(("ops", "result"), [
    ([{"op": "replace", "path": "/spec/imageCacheSize", "value": 40}],
     {**DOC, "spec": {"images": ["a", "b"], "imageCacheSize": 40}}),
    ([{"op": "add", "path": "/spec/images/-", "value": "c"}],
     {**DOC, "spec": {"images": ["a", "b", "c"], "imageCacheSize": 20}}),
    ([{"op": "add", "path": "/spec/images/0", "value": "z"}],
     {**DOC, "spec": {"images": ["z", "a", "b"], "imageCacheSize": 20}}),
    ([{"op": "remove", "path": "/spec/images/1"}], {**DOC, "spec": {"images": ["a"], "imageCacheSize": 20}}),
    ([{"op": "remove", "path": "/metadata/annotations/x~1y"}], {**DOC, "metadata": {"annotations": {}}}),
    ([{"op": "copy", "from": "/spec/images/0", "path": "/spec/images/-"}],
     {**DOC, "spec": {"images": ["a", "b", "a"], "imageCacheSize": 20}}),
    ([{"op": "move", "from": "/spec/images/0", "path": "/spec/images/-"}],
     {**DOC, "spec": {"images": ["b", "a"], "imageCacheSize": 20}}),
    ([{"op": "test", "path": "/spec/imageCacheSize", "value": 20},
      {"op": "add", "path": "/spec/retentionDays", "value": 7}],
     {**DOC, "spec": {"images": ["a", "b"], "imageCacheSize": 20, "retentionDays": 7}}),
])
def test_json_patch_follows_rfc_6902(ops: list[dict[str, Any]], result: Any) -> None:
    before = copy.deepcopy(DOC)
    assert json_patch(DOC, ops) == result
    assert before == DOC


@pytest.mark.parametrize(("ops", "message"), [
    ([{"op": "replace", "path": "/spec/retentionDays", "value": 1}], "does not exist"),
    ([{"op": "remove", "path": "/spec/images/5"}], "out of range"),
    ([{"op": "add", "path": "/spec/images/01", "value": "c"}], "not an array index"),
    ([{"op": "test", "path": "/spec/imageCacheSize", "value": 40}], "is not 40"),
    ([{"op": "add", "path": "spec", "value": 1}], "starts with '/'"),
    ([{"op": "add", "path": "/spec/x"}], "'value' is missing"),
    ([{"op": "frob", "path": "/spec"}], "unknown op"),
    ([{"op": "move", "from": "/spec", "path": "/spec/images/x"}], "inside"),
    ({"op": "add"}, "a list of operations"),
    ([{"op": "add", "path": "/spec/x", "value": 1}, {"op": "remove", "path": "/nothing"}], "does not exist"),
])
def test_a_json_patch_that_does_not_apply_changes_nothing(ops: Any, message: str) -> None:
    before = copy.deepcopy(DOC)
    with pytest.raises(PatchError, match=message):
        json_patch(DOC, ops)
    assert before == DOC


def test_unknown_fields_names_each_path() -> None:
    obj = {"apiVersion": "v", "kind": "k", "metadata": {"name": "a", "labelz": {}}, "spec": {"images": [], "size": 1},
           "status": {"anything": 1}, "extra": 1}
    assert unknown_fields(obj) == ["extra", "metadata.labelz", "spec.size"]
    assert unknown_fields({"metadata": {"name": "a"}, "spec": {"images": []}}) == []
