"""Patches as kubectl sends them: JSON merge patch (RFC 7386), JSON patch (RFC 6902),
and the field check behind ``fieldValidation=Strict``.

Each function takes plain JSON documents and returns a new one, leaving its inputs as
they were, so a refused patch changes nothing. A patch that cannot apply raises
``PatchError`` naming the operation and the path.
"""

from __future__ import annotations

import copy
from typing import Any

from builder.errors import ValidationError

MAX_OPERATIONS = 1000
"""A JSON patch for one ImageCache needs a handful of operations; thousands is abuse."""


class PatchError(ValidationError):
    """A patch that does not apply to the document (a missing path, a failed test)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, ``null`` deletes a key, anything else
    (lists included) replaces what was there."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: Any) -> list[str]:
    """RFC 6901: ``/a/b~1c`` is ``["a", "b/c"]``."""
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise PatchError(f"path {path!r}: a JSON pointer starts with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]] if path else []


def _index(container: list[Any], token: str, path: str, append: bool = False) -> int:
    if append and token == "-":
        return len(container)
    if not token.isascii() or not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise PatchError(f"path {path!r}: {token!r} is not an array index")
    index = int(token)
    if index > len(container) or (index == len(container) and not append):
        raise PatchError(f"path {path!r}: index {index} is out of range")
    return index


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for token in parts[:-1]:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, path)]
        else:
            raise PatchError(f"path {path!r} does not exist")
    return node


def _get(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        return doc
    parent = _parent(doc, parts, path)
    token = parts[-1]
    if isinstance(parent, dict) and token in parent:
        return parent[token]
    if isinstance(parent, list):
        return parent[_index(parent, token, path)]
    raise PatchError(f"path {path!r} does not exist")


def _remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        raise PatchError("remove: the whole document cannot be removed")
    parent = _parent(doc, parts, path)
    token = parts[-1]
    if isinstance(parent, dict) and token in parent:
        return parent.pop(token)
    if isinstance(parent, list):
        return parent.pop(_index(parent, token, path))
    raise PatchError(f"remove: path {path!r} does not exist")


def _add(doc: Any, path: str, value: Any) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent = _parent(doc, parts, path)
    token = parts[-1]
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, token, path, append=True), value)
    else:
        raise PatchError(f"add: the parent of {path!r} is not an object or an array")
    return doc


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902: apply ``add``, ``remove``, ``replace``, ``move``, ``copy`` and ``test``
    in order, all or nothing."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch is a list of operations")
    if len(operations) > MAX_OPERATIONS:
        raise PatchError(f"a JSON patch of {len(operations)} operations; at most {MAX_OPERATIONS} are accepted")
    result = copy.deepcopy(doc)
    for number, op in enumerate(operations, 1):
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise PatchError(f"operation {number}: want an object with an 'op'")
        kind, path = op["op"], op.get("path")
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"operation {number} ({kind}): 'value' is missing")
        if kind == "add":
            result = _add(result, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(result, path)
        elif kind == "replace":
            _get(result, path)  # must exist
            if not _pointer(path):
                result = copy.deepcopy(op["value"])
            else:
                _remove(result, path)
                result = _add(result, path, copy.deepcopy(op["value"]))
        elif kind in ("move", "copy"):
            source = op.get("from")
            if kind == "move" and isinstance(source, str) and isinstance(path, str) and path.startswith(source + "/"):
                raise PatchError(f"operation {number} (move): {path!r} is inside {source!r}")
            value = _remove(result, source) if kind == "move" else copy.deepcopy(_get(result, source))
            result = _add(result, path, value)
        elif kind == "test":
            if _get(result, path) != op["value"]:
                raise PatchError(f"operation {number} (test): the value at {path!r} is not {op['value']!r}")
        else:
            raise PatchError(f"operation {number}: unknown op {kind!r} (add, remove, replace, move, copy, test)")
    return result


# -- field validation ---------------------------------------------------------------------------------

OBJECT_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
METADATA_FIELDS = frozenset({
    "name", "generateName", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
    "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations", "ownerReferences",
    "finalizers", "managedFields", "selfLink",
})
SPEC_FIELDS = frozenset({"images", "imagePullSecrets", "imageCacheSize", "retentionDays"})


def unknown_fields(obj: dict[str, Any]) -> list[str]:
    """The paths of fields an ImageCache object does not have (status is imc's, and
    not checked), for ``fieldValidation=Strict``."""
    unknown = [key for key in obj if key not in OBJECT_FIELDS]
    metadata, spec = obj.get("metadata"), obj.get("spec")
    if isinstance(metadata, dict):
        unknown += [f"metadata.{key}" for key in metadata if key not in METADATA_FIELDS]
    if isinstance(spec, dict):
        unknown += [f"spec.{key}" for key in spec if key not in SPEC_FIELDS]
    return sorted(unknown)
