"""What kubectl needs from the API, called directly: discovery, the OpenAPI document,
tables, field selectors, the status subresource, and the kubeconfig.

A real ``Caches`` under ``tmp_path``; builds are held (never run), so every cache
stays in Creating and no network is touched.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.caches import BuildLease, Caches
from builder.imagecache import STALE_CONDITION
from builder.server import discovery
from builder.server.api import ImageCacheAPI

PREFIX = "/apis/eci.alibabacloud.com/v1/imagecaches"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
IMAGE = "127.0.0.1:1/x/y:1"


class HeldBuilds:
    """Keeps each lease until the test ends, so caches read as being built."""

    def __init__(self) -> None:
        self.leases: list[BuildLease] = []

    def submit(self, name: str, lease: BuildLease) -> None:
        self.leases.append(lease)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ImageCacheAPI]:
    held = HeldBuilds()
    yield ImageCacheAPI(Caches(tmp_path / "home"), held)
    for lease in held.leases:
        lease.release()


def call(api: ImageCacheAPI, method: str, path: str, body: Any = None, accept: str = "") -> tuple[int, Any]:
    raw = json.dumps(body).encode() if body is not None else b""
    headers = {"Accept": accept, **({"Content-Type": "application/json"} if body is not None else {})}
    resp = api.handle(method, path, headers, raw)
    return resp.status, json.loads(resp.body)


def create(api: ImageCacheAPI, name: str) -> dict[str, Any]:
    status, doc = call(api, "POST", PREFIX, {"apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache",
                                             "metadata": {"name": name}, "spec": {"images": [IMAGE]}})
    assert status == 201, doc
    return doc


def test_discovery_lists_imagecaches_cluster_scoped_with_short_name(api: ImageCacheAPI) -> None:
    status, groups = call(api, "GET", "/apis")
    assert status == 200 and groups["kind"] == "APIGroupList"
    (group,) = groups["groups"]
    assert group["name"] == "eci.alibabacloud.com"
    assert group["preferredVersion"] == {"groupVersion": "eci.alibabacloud.com/v1", "version": "v1"}
    status, core = call(api, "GET", "/api")
    assert status == 200 and core["kind"] == "APIVersions"
    status, resources = call(api, "GET", "/apis/eci.alibabacloud.com/v1")
    assert status == 200 and resources["groupVersion"] == "eci.alibabacloud.com/v1"
    main, sub = resources["resources"]
    assert main["name"] == "imagecaches" and main["kind"] == "ImageCache" and main["namespaced"] is False
    assert main["shortNames"] == ["imc"] and main["singularName"] == "imagecache"
    assert {"create", "get", "list", "delete"} <= set(main["verbs"])
    assert sub == {"name": "imagecaches/status", "singularName": "", "namespaced": False, "kind": "ImageCache",
                   "verbs": ["get"]}
    status, version = call(api, "GET", "/version/")
    assert status == 200 and version["major"] == "1" and version["gitVersion"].startswith("v1.")


def test_discovery_documents_are_read_only(api: ImageCacheAPI) -> None:
    status, doc = call(api, "POST", "/apis", {"x": 1})
    assert status == 405 and doc["reason"] == "MethodNotAllowed"
    status, doc = call(api, "GET", "/apis/other.example.com/v1")
    assert status == 404 and doc["reason"] == "NotFound"


def test_openapi_v3_points_to_the_group_version_and_describes_the_spec(api: ImageCacheAPI) -> None:
    status, root = call(api, "GET", "/openapi/v3")
    assert status == 200
    url = root["paths"]["apis/eci.alibabacloud.com/v1"]["serverRelativeURL"]
    assert url.startswith("/openapi/v3/apis/eci.alibabacloud.com/v1?hash=")
    status, doc = call(api, "GET", url)
    assert status == 200 and doc["openapi"].startswith("3.")
    schema = doc["components"]["schemas"]["com.alibabacloud.eci.v1.ImageCache"]
    assert schema["x-kubernetes-group-version-kind"] == [
        {"group": "eci.alibabacloud.com", "kind": "ImageCache", "version": "v1"}]
    spec = schema["properties"]["spec"]
    assert spec["additionalProperties"] is False and spec["required"] == ["images"]
    assert set(spec["properties"]) == {"images", "imagePullSecrets", "imageCacheSize", "retentionDays"}
    assert spec["properties"]["imageCacheSize"]["minimum"] == 20
    assert spec["properties"]["images"]["maxItems"] == 20
    status, _ = call(api, "GET", "/openapi/v2")
    assert status == 404  # kubectl falls back to it only when v3 is missing


def test_list_as_table_has_the_crd_columns(api: ImageCacheAPI) -> None:
    created = create(api, "web")
    create(api, "api")
    status, table = call(api, "GET", PREFIX, accept=TABLE)
    assert status == 200 and table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    names = [c["name"] for c in table["columnDefinitions"] if c["priority"] == 0]
    assert names == ["Name", "Age", "CacheId", "Phase", "Progress"]
    wide = [c["name"] for c in table["columnDefinitions"] if c["priority"] == 1]
    assert wide == ["Size", "Images", "Last-Used", "Hits", "Stale"]
    rows = {r["cells"][0]: r for r in table["rows"]}
    assert set(rows) == {"web", "api"}
    web = rows["web"]
    assert web["cells"][2:] == [created["status"]["imageCacheId"], "Creating", "0%", 20, IMAGE, None, 0, "-"]
    assert web["cells"][1].endswith("s")  # an age, not a timestamp
    api.caches.mark_used("web", 3)
    _, table = call(api, "GET", PREFIX, accept=TABLE)
    used = {r["cells"][0]: r["cells"][-3:-1] for r in table["rows"]}
    assert used["web"][0].endswith("s") and used["web"][1] == 3 and used["api"] == [None, 0]
    assert web["object"]["kind"] == "PartialObjectMetadata"
    assert web["object"]["metadata"]["name"] == "web"
    api.caches.change("web", lambda c: c.set_condition(STALE_CONDITION, True, "TagDrifted", "moved"))
    api.caches.change("api", lambda c: c.set_condition(STALE_CONDITION, False, "TagsCurrent", "current"))
    _, table = call(api, "GET", PREFIX, accept=TABLE)
    assert {r["cells"][0]: r["cells"][-1] for r in table["rows"]} == {"web": "yes", "api": "no"}


def test_table_of_one_and_include_object(api: ImageCacheAPI) -> None:
    create(api, "web")
    status, table = call(api, "GET", f"{PREFIX}/web?includeObject=Object", accept=TABLE)
    assert status == 200 and [r["cells"][0] for r in table["rows"]] == ["web"]
    assert table["rows"][0]["object"]["kind"] == "ImageCache"
    status, table = call(api, "GET", f"{PREFIX}?includeObject=None", accept=TABLE)
    assert status == 200 and "object" not in table["rows"][0]
    status, doc = call(api, "GET", f"{PREFIX}?includeObject=All", accept=TABLE)
    assert status == 400 and "includeObject" in doc["message"]
    status, doc = call(api, "GET", f"{PREFIX}/web")  # no table asked: the object
    assert status == 200 and doc["kind"] == "ImageCache"


@pytest.mark.parametrize(("seconds", "shown"), [
    (-5, "<invalid>"), (-1, "0s"), (0, "0s"), (119, "119s"), (120, "2m"), (150, "2m30s"), (600, "10m"),
    (3 * 3600, "3h"), (3 * 3600 + 60, "3h1m"), (8 * 3600, "8h"), (47 * 3600, "47h"), (48 * 3600, "2d"),
    (49 * 3600, "2d1h"), (8 * 86400, "8d"), (730 * 86400, "2y"), (731 * 86400, "2y1d"), (3000 * 86400, "8y"),
])
def test_ages_print_as_kubectl_prints_them(seconds: int, shown: str) -> None:
    assert discovery.human_duration(seconds) == shown


def test_table_age_counts_to_now() -> None:
    now = dt.datetime(2026, 11, 30, 12, 0, 0, tzinfo=dt.UTC)
    obj = {"metadata": {"name": "a", "creationTimestamp": "2026-11-30T11:56:40Z"}, "spec": {}, "status": {}}
    assert discovery.table([obj], now)["rows"][0]["cells"][1] == "3m20s"


def test_field_selector_on_the_name(api: ImageCacheAPI) -> None:
    create(api, "web")
    create(api, "api")
    status, doc = call(api, "GET", f"{PREFIX}?fieldSelector=metadata.name%3Dweb")
    assert status == 200 and [i["metadata"]["name"] for i in doc["items"]] == ["web"]
    status, doc = call(api, "GET", f"{PREFIX}?fieldSelector=metadata.name%3Dnone")
    assert status == 200 and doc["items"] == []
    status, doc = call(api, "GET", f"{PREFIX}?fieldSelector=status.phase%3DReady")
    assert status == 400 and doc["reason"] == "BadRequest" and "metadata.name" in doc["message"]


def test_status_subresource_reads_and_refuses_writes(api: ImageCacheAPI) -> None:
    create(api, "web")
    status, doc = call(api, "GET", f"{PREFIX}/web/status")
    assert status == 200 and doc["status"]["phase"] == "Creating"
    status, doc = call(api, "PUT", f"{PREFIX}/web/status", {"status": {"phase": "Ready"}})
    assert status == 405 and doc["reason"] == "MethodNotAllowed"
    status, doc = call(api, "GET", f"{PREFIX}/web")
    assert doc["status"]["phase"] == "Creating"
    status, doc = call(api, "GET", f"{PREFIX}/web/other")
    assert status == 404


@pytest.mark.parametrize(("path", "owned"), [
    ("/api", True), ("/apis", True), ("/apis/eci.alibabacloud.com/v1/imagecaches/x", True), ("/version", True),
    ("/openapi/v3", True), ("/openapi/v2", True), ("/v2/", False), ("/v2/apis/manifests/x", False),
    ("/metrics", False), ("/apix", False),
])
def test_the_api_owns_its_paths_only(path: str, owned: bool) -> None:
    assert ImageCacheAPI.owns(path) is owned


def test_kubeconfig_names_one_cluster_user_and_context() -> None:
    doc = discovery.kubeconfig("http://127.0.0.1:5050")
    assert doc["current-context"] == "imc"
    assert doc["clusters"] == [{"name": "imc", "cluster": {"server": "http://127.0.0.1:5050"}}]
    assert doc["users"] == [{"name": "imc", "user": {}}]
    assert discovery.kubeconfig("http://h:1", token="t0k")["users"][0]["user"] == {"token": "t0k"}
    cluster = discovery.kubeconfig("https://h:1", token="t0k", ca=b"PEM\n")["clusters"][0]["cluster"]
    assert cluster == {"server": "https://h:1", "certificate-authority-data": "UEVNCg=="}


def obj_of(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache", "metadata": {"name": name},
            "spec": {"images": [IMAGE], **spec}}


def send(api: ImageCacheAPI, method: str, path: str, body: Any, content_type: str,
         **headers: str) -> tuple[int, Any, dict[str, str]]:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    resp = api.handle(method, path, {"Content-Type": content_type, **headers}, raw)
    return resp.status, json.loads(resp.body), resp.headers


def test_metadata_uid_generation_and_resource_version(api: ImageCacheAPI) -> None:
    created = create(api, "web")
    meta = created["metadata"]
    assert str(uuid.UUID(meta["uid"])) == meta["uid"]
    assert meta["generation"] == 1 and created["status"]["observedGeneration"] == 0
    assert meta["creationTimestamp"]
    before = int(meta["resourceVersion"])
    api.caches.mark_used("web")  # a write that is not a spec change
    _, doc = call(api, "GET", f"{PREFIX}/web")
    assert int(doc["metadata"]["resourceVersion"]) > before
    assert doc["metadata"]["generation"] == 1 and doc["metadata"]["uid"] == meta["uid"]
    _, listed = call(api, "GET", PREFIX)
    assert int(listed["metadata"]["resourceVersion"]) >= int(doc["metadata"]["resourceVersion"])


def test_a_stale_resource_version_is_a_conflict_and_changes_nothing(api: ImageCacheAPI) -> None:
    created = create(api, "web")
    api.caches.mark_used("web")
    stale = {**obj_of("web", retentionDays=3), "metadata": {"name": "web",
                                                              "resourceVersion": created["metadata"]["resourceVersion"]}}
    status, doc, _ = send(api, "PUT", f"{PREFIX}/web", stale, "application/json")
    assert status == 409 and doc["reason"] == "Conflict"
    assert doc["message"] == ('Operation cannot be fulfilled on imagecaches.eci.alibabacloud.com "web": the object '
                              'has been modified; please apply your changes to the latest version and try again')
    status, doc, _ = send(api, "PATCH", f"{PREFIX}/web", {"metadata": {"resourceVersion": "1"},
                                                            "spec": {"retentionDays": 3}},
                          "application/merge-patch+json")
    assert status == 409 and doc["reason"] == "Conflict"
    _, now = call(api, "GET", f"{PREFIX}/web")
    assert "retentionDays" not in now["spec"]


def test_updates_follow_the_phase_rules_of_caches(api: ImageCacheAPI) -> None:
    create(api, "web")  # held in Creating: Caches refuses updates
    status, doc, _ = send(api, "PATCH", f"{PREFIX}/web", {"spec": {"retentionDays": 3}}, "application/merge-patch+json")
    assert status == 409 and doc["reason"] == "Conflict" and "Creating" in doc["message"]
    status, doc, _ = send(api, "PUT", f"{PREFIX}/web", obj_of("web", retentionDays=3), "application/json")
    assert status == 409 and "Creating" in doc["message"]


@pytest.mark.parametrize(("body", "content_type", "code", "reason", "words"), [
    ({"spec": {"imageCacheSize": 5}}, "application/merge-patch+json", 422, "Invalid", "imageCacheSize"),
    ([{"op": "remove", "path": "/spec/nothing"}], "application/json-patch+json", 422, "Invalid", "does not exist"),
    ({"op": "remove"}, "application/json-patch+json", 400, "BadRequest", "list of operations"),
    ({"spec": {}}, "application/strategic-merge-patch+json", 415, "UnsupportedMediaType", "merge-patch"),
    ({"metadata": {"name": "other"}}, "application/merge-patch+json", 400, "BadRequest", "does not match"),
    ("{not json", "application/merge-patch+json", 400, "BadRequest", "not valid JSON"),
])
def test_refused_patches_change_nothing(api: ImageCacheAPI, body: Any, content_type: str, code: int, reason: str,
                                        words: str) -> None:
    before = create(api, "web")
    status, doc, _ = send(api, "PATCH", f"{PREFIX}/web", body, content_type)
    assert (status, doc["reason"]) == (code, reason) and words in doc["message"], doc
    _, after = call(api, "GET", f"{PREFIX}/web")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_patch_of_a_missing_cache_is_not_found(api: ImageCacheAPI) -> None:
    status, doc, _ = send(api, "PATCH", f"{PREFIX}/none", {"spec": {}}, "application/merge-patch+json")
    assert status == 404 and doc["reason"] == "NotFound"


def test_field_validation_strict_warn_and_ignore(api: ImageCacheAPI) -> None:
    obj = {**obj_of("web"), "extra": 1}
    obj["metadata"]["labelz"] = {}
    status, doc, _ = send(api, "POST", f"{PREFIX}?fieldValidation=Strict", obj, "application/json")
    assert status == 400 and doc["reason"] == "BadRequest"
    assert 'strict decoding error: unknown field "extra", unknown field "metadata.labelz"' in doc["message"]
    status, doc, headers = send(api, "POST", PREFIX, obj, "application/json")
    assert status == 201
    assert headers["Warning"] == '299 - "unknown field \\"extra\\"", 299 - "unknown field \\"metadata.labelz\\""'
    status, doc, headers = send(api, "POST", f"{PREFIX}?fieldValidation=Ignore", {**obj_of("api"), "x": 1},
                                "application/json")
    assert status == 201 and "Warning" not in headers
    status, doc, _ = send(api, "POST", f"{PREFIX}?fieldValidation=Loose", obj_of("b"), "application/json")
    assert status == 400 and "fieldValidation" in doc["message"]


def test_server_side_apply_creates_and_needs_a_field_manager(api: ImageCacheAPI) -> None:
    text = json.dumps(obj_of("web"))
    status, doc, _ = send(api, "PATCH", f"{PREFIX}/web", text, "application/apply-patch+yaml")
    assert status == 400 and "fieldManager" in doc["message"]
    status, doc, _ = send(api, "PATCH", f"{PREFIX}/web?fieldManager=kubectl", text, "application/apply-patch+yaml")
    assert status == 201 and doc["status"]["phase"] == "Creating"


def test_watch_streams_added_modified_and_deleted(api: ImageCacheAPI) -> None:
    create(api, "web")
    resp = api.handle("GET", f"{PREFIX}?watch=true&timeoutSeconds=5", {}, b"")
    assert resp.status == 200 and resp.stream is not None
    events = (json.loads(line) for line in resp.stream)
    first = next(events)
    assert first["type"] == "ADDED" and first["object"]["metadata"]["name"] == "web"
    api.caches.mark_used("web")
    second = next(events)
    assert second["type"] == "MODIFIED"
    assert int(second["object"]["metadata"]["resourceVersion"]) > int(first["object"]["metadata"]["resourceVersion"])
    create(api, "api")
    assert (lambda e: (e["type"], e["object"]["metadata"]["name"]))(next(events)) == ("ADDED", "api")
    api.caches.delete("web")
    third = next(events)
    assert third["type"] == "DELETED" and third["object"]["metadata"]["name"] == "web"
    resp.stream.close()
    assert api._watches == 0


def test_watch_from_a_resource_version_and_by_name_as_table(api: ImageCacheAPI) -> None:
    created = create(api, "web")
    create(api, "api")
    since = created["metadata"]["resourceVersion"]
    resp = api.handle("GET", f"{PREFIX}?watch=1&resourceVersion={since}&fieldSelector=metadata.name%3Dweb"
                      "&timeoutSeconds=1", {"Accept": TABLE}, b"")
    assert resp.stream is not None
    api.caches.mark_used("web")
    events = [json.loads(line) for line in resp.stream]  # ends at timeoutSeconds
    assert [e["type"] for e in events] == ["MODIFIED"]
    assert events[0]["object"]["kind"] == "Table" and events[0]["object"]["rows"][0]["cells"][0] == "web"


def test_watches_are_bounded(api: ImageCacheAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("builder.server.api.MAX_WATCHES", 1)
    first = api.handle("GET", f"{PREFIX}?watch=true&timeoutSeconds=1", {}, b"")
    second = api.handle("GET", f"{PREFIX}?watch=true", {}, b"")
    assert second.status == 429 and json.loads(second.body)["reason"] == "TooManyRequests"
    assert first.stream is not None
    assert list(first.stream) == []
    third = api.handle("GET", f"{PREFIX}?watch=true&timeoutSeconds=1", {}, b"")
    assert third.status == 200 and third.stream is not None
    third.stream.close()
    status, _ = call(api, "GET", f"{PREFIX}?watch=true&timeoutSeconds=x")
    assert status == 400


def test_the_api_answers_other_machines_only_with_a_token(tmp_path: Path) -> None:
    open_api = ImageCacheAPI(Caches(tmp_path / "a"), HeldBuilds())
    assert open_api.handle("GET", "/apis", {}, b"", peer="127.0.0.1").status == 200
    assert open_api.handle("GET", "/apis", {}, b"", peer="::1").status == 200
    denied = open_api.handle("GET", PREFIX, {}, b"", peer="192.0.2.7")
    assert denied.status == 401 and "--api-token-file" in json.loads(denied.body)["message"]
    guarded = ImageCacheAPI(Caches(tmp_path / "b"), HeldBuilds(), token="t" * 20)
    assert guarded.handle("GET", PREFIX, {}, b"", peer="127.0.0.1").status == 401
    wrong = guarded.handle("GET", PREFIX, {"Authorization": "Bearer " + "u" * 20}, b"", peer="192.0.2.7")
    assert wrong.status == 401 and wrong.headers["WWW-Authenticate"].startswith("Bearer")
    ok = guarded.handle("GET", PREFIX, {"Authorization": "Bearer " + "t" * 20}, b"", peer="192.0.2.7")
    assert ok.status == 200


def test_watch_with_initial_events_ends_them_with_a_bookmark(api: ImageCacheAPI) -> None:
    create(api, "web")
    resp = api.handle("GET", f"{PREFIX}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
                      "&allowWatchBookmarks=true&timeoutSeconds=1", {}, b"")
    assert resp.stream is not None
    events = [json.loads(line) for line in resp.stream]
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
