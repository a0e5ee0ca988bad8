"""What kubectl needs from the API, called directly: discovery, the OpenAPI document,
tables, field selectors, the status subresource, and the kubeconfig.

A real ``Caches`` under ``tmp_path``; builds are held (never run), so every cache
stays in Creating and no network is touched.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.caches import BuildLease, Caches
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
    assert wide == ["Size", "Images"]
    rows = {r["cells"][0]: r for r in table["rows"]}
    assert set(rows) == {"web", "api"}
    web = rows["web"]
    assert web["cells"][2:] == [created["status"]["imageCacheId"], "Creating", "0%", 20, IMAGE]
    assert web["cells"][1].endswith("s")  # an age, not a timestamp
    assert web["object"]["kind"] == "PartialObjectMetadata"
    assert web["object"]["metadata"]["name"] == "web"


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
