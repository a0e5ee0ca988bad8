"""What a Kubernetes client asks before it sends a request: discovery, the version,
the OpenAPI schema, and tables for ``kubectl get``.

``kubectl`` finds a resource through the legacy discovery documents (``/api``,
``/apis``, the group and the group version), validates what it sends against the
OpenAPI v3 schema of the group version (``/openapi/v3``, whose parameters also say
that the server validates fields itself), and prints what ``get`` lists from a
``meta.k8s.io/v1`` Table. Every document here is plain data built from the one
resource imc owns, so each can be tested without a server.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from typing import Any

from builder import __version__
from builder.imagecache import (
    API_VERSION,
    KIND,
    MAX_IMAGES,
    RETENTION_MAX,
    RETENTION_MIN,
    SIZE_DEFAULT,
    SIZE_MAX,
    SIZE_MIN,
    STALE_CONDITION,
)

GROUP = "eci.alibabacloud.com"
VERSION = "v1"
RESOURCE = "imagecaches"
SINGULAR = "imagecache"
SHORT_NAMES = ["imc"]
LIST_KIND = KIND + "List"
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
"""What the API answers on the resource, as discovery announces it to clients."""

GROUP_VERSION_PATH = f"/apis/{API_VERSION}"
OPENAPI_V3_PATH = f"/openapi/v3/apis/{API_VERSION}"
KUBE_MINOR = "32"
"""The Kubernetes API level these documents follow (the kubectl the tests run)."""


def version() -> dict[str, Any]:
    """``/version``: the API level served, and imc's own version in ``gitVersion``."""
    return {"major": "1", "minor": KUBE_MINOR, "gitVersion": f"v1.{KUBE_MINOR}.0+imc.{__version__}",
            "gitCommit": "", "gitTreeState": "", "buildDate": "", "goVersion": "", "compiler": "",
            "platform": "linux/amd64"}


def core_versions() -> dict[str, Any]:
    """``/api``: the core group; imc serves none of its resources."""
    return {"kind": "APIVersions", "versions": [], "serverAddressByClientCIDRs": []}


def _group() -> dict[str, Any]:
    gv = {"groupVersion": API_VERSION, "version": VERSION}
    return {"name": GROUP, "versions": [gv], "preferredVersion": gv}


def group_list() -> dict[str, Any]:
    """``/apis``: the one group imc serves."""
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group()]}


def group() -> dict[str, Any]:
    """``/apis/eci.alibabacloud.com``."""
    return {"kind": "APIGroup", "apiVersion": "v1", **_group()}


def resource_list() -> dict[str, Any]:
    """``/apis/eci.alibabacloud.com/v1``: ImageCache, cluster-scoped, short name ``imc``,
    with a read-only status subresource."""
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": API_VERSION, "resources": [
        {"name": RESOURCE, "singularName": SINGULAR, "namespaced": False, "kind": KIND, "verbs": list(VERBS),
         "shortNames": list(SHORT_NAMES), "categories": ["all"]},
        {"name": f"{RESOURCE}/status", "singularName": "", "namespaced": False, "kind": KIND, "verbs": ["get"]},
    ]}


# -- the schema -------------------------------------------------------------------------------------


def _string_list(description: str, max_items: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "description": description, "items": {"type": "string"}}
    if max_items is not None:
        schema["maxItems"] = max_items
    return schema


def image_cache_schema() -> dict[str, Any]:
    """The ImageCache object as OpenAPI v3 (the CRD's ``openAPIV3Schema``).

    ``spec`` is closed: an unknown field is an error, as the API refuses it.
    ``status`` is written by imc alone, so its shape is described, not enforced.
    """
    spec = {
        "type": "object",
        "description": "What the cache holds and for how long.",
        "required": ["images"],
        "additionalProperties": False,
        "properties": {
            "images": {**_string_list("Image references (name:tag or name@digest).", MAX_IMAGES), "minItems": 1},
            "imagePullSecrets": _string_list("namespace:name of Secrets of type kubernetes.io/dockerconfigjson."),
            "imageCacheSize": {"type": "integer", "minimum": SIZE_MIN, "maximum": SIZE_MAX,
                               "default": SIZE_DEFAULT, "nullable": True,
                               "description": "GiB; the images' unpacked size must fit."},
            "retentionDays": {"type": "integer", "minimum": RETENTION_MIN, "maximum": RETENTION_MAX,
                              "nullable": True, "description": "Days from creation; absent: never expires."},
        },
    }
    status = {
        "type": "object",
        "description": "Where the cache stands; written by imc only.",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "phase": {"type": "string", "enum": ["Creating", "Ready", "Failed", "Updating", "UpdateFailed"]},
            "progress": {"type": "string"},
            "imageCacheId": {"type": "string"},
            "observedGeneration": {"type": "integer"},
            "startTime": {"type": "string", "format": "date-time", "nullable": True},
            "lastUpdatedTime": {"type": "string", "format": "date-time", "nullable": True},
            "expireDateTime": {"type": "string", "format": "date-time", "nullable": True},
            "lastUsedTime": {"type": "string", "format": "date-time",
                             "description": "The last use: a match, or a hit through imc serve."},
            "hitCount": {"type": "integer", "description": "Manifests and blobs imc serve answered from the cache."},
            "conditions": {
                "type": "array",
                "description": "Kubernetes-shaped conditions; Stale is True while a tag the cache was built "
                               "from points at other content.",
                "items": {
                    "type": "object",
                    "required": ["type", "status"],
                    "properties": {
                        "type": {"type": "string"},
                        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                        "reason": {"type": "string"},
                        "message": {"type": "string"},
                        "lastTransitionTime": {"type": "string", "format": "date-time"},
                        "observedGeneration": {"type": "integer"},
                    },
                },
            },
            "message": {"type": "string"},
        },
    }
    return {
        "type": "object",
        "description": "A snapshot of container images, built ahead of time so containers start without "
                       "pulling their layers.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-group-version-kind": [{"group": GROUP, "kind": KIND, "version": VERSION}],
    }


def _object_meta_schema() -> dict[str, Any]:
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    return {"type": "object", "description": "Standard object metadata.", "properties": {
        "name": {"type": "string"}, "uid": {"type": "string"}, "resourceVersion": {"type": "string"},
        "generation": {"type": "integer", "format": "int64"},
        "creationTimestamp": {"type": "string", "format": "date-time"},
        "annotations": string_map, "labels": string_map,
        "managedFields": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    }}


def _list_schema() -> dict[str, Any]:
    return {"type": "object", "required": ["items"], "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
        "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{_schema_name(KIND)}"}},
    }, "x-kubernetes-group-version-kind": [{"group": GROUP, "kind": LIST_KIND, "version": VERSION}]}


def _schema_name(kind: str) -> str:
    """The schema's name, reversed-domain style as Kubernetes names them."""
    return f"com.alibabacloud.eci.{VERSION}.{kind}"


def _operation(verb: str, action: str, body: bool, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{_schema_name(KIND)}"}
    op: dict[str, Any] = {
        "operationId": f"{verb}{KIND}",
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": GROUP, "kind": KIND, "version": VERSION},
        "parameters": parameters,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}}},
    }
    if body:
        op["requestBody"] = {"content": {"application/json": {"schema": ref}, "application/yaml": {"schema": ref}}}
    return op


def _query(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": {"type": "string"}}


def openapi_v3_group_version() -> dict[str, Any]:
    """``/openapi/v3/apis/eci.alibabacloud.com/v1``: the ImageCache schema and its paths.

    The ``fieldValidation`` parameter on create tells kubectl that this server checks
    fields itself (``Strict`` refuses unknown ones), so it sends requests as they are.
    """
    field_validation = _query("fieldValidation", "Ignore, Warn or Strict: what to do with unknown fields.")
    dry_run = _query("dryRun", "All: validate, change nothing.")
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    collection = f"/apis/{API_VERSION}/{RESOURCE}"
    item: dict[str, Any] = {"parameters": [name], "get": _operation("read", "get", False, [])}
    if "update" in VERBS:
        item["put"] = _operation("replace", "put", True, [dry_run, field_validation])
    if "patch" in VERBS:
        item["patch"] = _operation("patch", "patch", True, [dry_run, field_validation])
    item["delete"] = _operation("delete", "delete", False, [dry_run])
    return {
        "openapi": "3.0.0",
        "info": {"title": "imc", "version": __version__},
        "paths": {
            collection: {
                "get": _operation("list", "list", False, [_query("watch", "Stream changes.")]),
                "post": _operation("create", "post", True, [dry_run, field_validation]),
            },
            f"{collection}/{{name}}": item,
        },
        "components": {"schemas": {
            _schema_name(KIND): image_cache_schema(),
            _schema_name(LIST_KIND): _list_schema(),
            "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta": _object_meta_schema(),
        }},
    }


def openapi_v3_root() -> dict[str, Any]:
    """``/openapi/v3``: where each group version's document is, with a content hash so
    clients may cache it."""
    digest = hashlib.sha256(json.dumps(openapi_v3_group_version(), sort_keys=True).encode()).hexdigest()
    return {"paths": {f"apis/{API_VERSION}": {"serverRelativeURL": f"{OPENAPI_V3_PATH}?hash={digest.upper()}"}}}


def documents() -> dict[str, Any]:
    """Every fixed document by its path."""
    return {
        "/version": version(),
        "/api": core_versions(),
        "/apis": group_list(),
        f"/apis/{GROUP}": group(),
        GROUP_VERSION_PATH: resource_list(),
        "/openapi/v3": openapi_v3_root(),
        OPENAPI_V3_PATH: openapi_v3_group_version(),
    }


# -- tables -----------------------------------------------------------------------------------------

COLUMNS = [
    {"name": "Name", "type": "string", "format": "name", "priority": 0,
     "description": "The cache's name, unique."},
    {"name": "Age", "type": "date", "format": "", "priority": 0,
     "description": "Time since the cache was created."},
    {"name": "CacheId", "type": "string", "format": "", "priority": 0,
     "description": "The cache's id (imc-…), stable for its life."},
    {"name": "Phase", "type": "string", "format": "", "priority": 0,
     "description": "Creating, Ready, Failed, Updating or UpdateFailed."},
    {"name": "Progress", "type": "string", "format": "", "priority": 0,
     "description": "How far the current phase is, 0% to 100%."},
    {"name": "Size", "type": "integer", "format": "", "priority": 1,
     "description": "imageCacheSize, in GiB."},
    {"name": "Images", "type": "string", "format": "", "priority": 1,
     "description": "The images asked for."},
    {"name": "Last-Used", "type": "date", "format": "", "priority": 1,
     "description": "Time since the cache was last used (a match, or a hit through imc serve)."},
    {"name": "Hits", "type": "integer", "format": "", "priority": 1,
     "description": "Manifests and blobs imc serve answered from the cache."},
    {"name": "Stale", "type": "string", "format": "", "priority": 1,
     "description": "yes when a tag the cache was built from moved (the Stale condition), no when checked "
                    "and current, - when never checked."},
]
"""The CRD's printer columns: NAME, AGE, CACHEID, PHASE, PROGRESS, and with ``-o wide``
SIZE, IMAGES, LAST-USED, HITS and STALE (as ``imc cache list`` shows it)."""


def wants_table(accept: str) -> bool:
    """Whether ``Accept`` asks for a ``meta.k8s.io/v1`` Table (kubectl get does)."""
    for item in accept.split(","):
        media, *params = [p.strip() for p in item.split(";")]
        values = dict(p.split("=", 1) for p in params if "=" in p)
        if (media.lower() == "application/json" and values.get("as") == "Table"
                and values.get("g") == "meta.k8s.io" and values.get("v") == "v1"):
            return True
    return False


def human_duration(seconds: float) -> str:
    """An age the way ``kubectl get`` prints one (``45s``, ``3m20s``, ``5h``, ``12d``),
    the server's job for a Table's date column."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if hours < 24 * 365 * 2:
        return f"{days}d"
    if hours < 24 * 365 * 8:
        return f"{days // 365}y{days % 365}d" if days % 365 else f"{days // 365}y"
    return f"{days // 365}y"


def _age(created: str | None, now: dt.datetime) -> str:
    if not created:
        return "<unknown>"
    try:
        since = dt.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return "<unknown>"
    return human_duration((now - since).total_seconds())


def _stale(status: dict[str, Any]) -> str:
    found = next((c for c in status.get("conditions", []) if c.get("type") == STALE_CONDITION), None)
    return "-" if found is None else "yes" if found.get("status") == "True" else "no"


def table(objects: list[dict[str, Any]], now: dt.datetime, include: str = "Metadata",
          list_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """ImageCache objects as a Table, ages counted to ``now``. ``include`` is the
    request's ``includeObject``: None, Metadata (the default: PartialObjectMetadata per
    row) or Object."""
    rows = []
    for obj in objects:
        meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status", {})
        cells = [meta.get("name"), _age(meta.get("creationTimestamp"), now), status.get("imageCacheId") or meta.get("uid"),
                 status.get("phase") or "", status.get("progress") or "", spec.get("imageCacheSize"),
                 ",".join(spec.get("images", [])),
                 _age(status["lastUsedTime"], now) if status.get("lastUsedTime") else None, status.get("hitCount", 0),
                 _stale(status)]
        row: dict[str, Any] = {"cells": cells}
        if include == "Object":
            row["object"] = obj
        elif include != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": dict(list_meta or {}),
            "columnDefinitions": [dict(c) for c in COLUMNS], "rows": rows}



def kubeconfig(server: str, token: str | None = None, ca: bytes | None = None) -> dict[str, Any]:
    """A kubeconfig with one cluster (``imc``, at ``server``), user and context, for
    ``kubectl`` to manage the caches of this machine. ``token`` is the bearer token
    the API asks remote clients for; ``ca`` the PEM CA an https server is verified with."""
    user: dict[str, Any] = {"token": token} if token else {}
    cluster: dict[str, Any] = {"server": server}
    if ca:
        cluster["certificate-authority-data"] = base64.b64encode(ca).decode()
    return {"apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "imc", "cluster": cluster}],
            "users": [{"name": "imc", "user": user}],
            "contexts": [{"name": "imc", "context": {"cluster": "imc", "user": "imc"}}],
            "current-context": "imc"}
