"""The Kubernetes-style ImageCache API, called directly (no HTTP server).

Every test uses a real ``Caches`` under ``tmp_path``. Most tests hand builds to a
``HeldBuilds`` runner that keeps each lease until the test ends, so the caches stay
in Creating and no network is touched; the build test uses the real ``BuildRunner``
against a registry address where nothing listens, so the build fails on its own.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.build import Builder
from builder.caches import BuildLease, Caches
from builder.errors import CacheDeletedError, CacheStateError, NotFoundLocalError
from builder.imagecache import FAILED, CacheSpec, ImageCache, Settings, spec_from_object
from builder.server.api import MAX_BODY_BYTES, BuildRunner, ImageCacheAPI, Response, RunnerClosedError

PREFIX = "/apis/eci.alibabacloud.com/v1/imagecaches"
DEAD_REGISTRY = "127.0.0.1:1"  # nothing listens on port 1: connection refused at once
IMAGE = f"{DEAD_REGISTRY}/x/y:1"


class HeldBuilds:
    """A runner that starts nothing: it keeps each lease (so the cache reads as being
    built) until ``release_all``, and records what it was given."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, BuildLease]] = []

    def submit(self, name: str, lease: BuildLease) -> None:
        self.submitted.append((name, lease))

    def release_all(self) -> None:
        for _, lease in self.submitted:
            lease.release()


@pytest.fixture
def caches(tmp_path: Path) -> Caches:
    return Caches(tmp_path / "home")


@pytest.fixture
def held() -> Iterator[HeldBuilds]:
    builds = HeldBuilds()
    yield builds
    builds.release_all()


@pytest.fixture
def api(caches: Caches, held: HeldBuilds) -> ImageCacheAPI:
    return ImageCacheAPI(caches, held)


def cache_yaml(name: str = "web", **spec: Any) -> str:
    obj = cache_obj(name, **spec)
    return yaml.safe_dump(obj, sort_keys=False)


def cache_obj(name: str = "web", annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "eci.alibabacloud.com/v1",
        "kind": "ImageCache",
        "metadata": {"name": name, "annotations": {"k8s.aliyun.com/plain-http-registry": DEAD_REGISTRY,
                                                    **(annotations or {})}},
        "spec": {"images": [IMAGE], **spec},
    }


def call(api: ImageCacheAPI, method: str, path: str = PREFIX, body: bytes | str = b"",
         headers: dict[str, str] | None = None) -> tuple[Response, Any]:
    raw = body.encode() if isinstance(body, str) else body
    resp = api.handle(method, path, headers or {}, raw)
    doc = yaml.safe_load(resp.body) if resp.content_type == "application/yaml" else json.loads(resp.body)
    return resp, doc


def post_yaml(api: ImageCacheAPI, text: str, path: str = PREFIX) -> tuple[Response, Any]:
    return call(api, "POST", path, text, {"Content-Type": "application/yaml"})


def post_json(api: ImageCacheAPI, obj: Any, path: str = PREFIX) -> tuple[Response, Any]:
    return call(api, "POST", path, json.dumps(obj), {"Content-Type": "application/json"})


def failure(doc: dict[str, Any], code: int, reason: str, name: str | None = None) -> None:
    """Assert ``doc`` is a Kubernetes failure Status."""
    assert doc["kind"] == "Status" and doc["apiVersion"] == "v1" and doc["metadata"] == {}
    assert doc["status"] == "Failure"
    assert doc["code"] == code and doc["reason"] == reason
    assert isinstance(doc["message"], str) and doc["message"]
    assert doc["details"]["group"] == "eci.alibabacloud.com"
    assert doc["details"]["kind"] == ("ImageCache" if reason == "Invalid" else "imagecaches")
    if name is not None:
        assert doc["details"]["name"] == name


def snapshot(caches: Caches) -> tuple[list[dict[str, Any]], set[str]]:
    """Every record, and every file outside the database (whose WAL files come and go
    with connections, not writes)."""
    records = [c.to_doc() for c in caches.list()]
    files = {str(p.relative_to(caches.home.root)) for p in caches.home.root.rglob("*")
             if not p.name.startswith("caches.db")}
    return records, files


def assert_creating_object(doc: dict[str, Any], name: str) -> None:
    assert doc["apiVersion"] == "eci.alibabacloud.com/v1" and doc["kind"] == "ImageCache"
    assert doc["metadata"]["name"] == name
    assert doc["status"]["phase"] == "Creating"
    assert doc["status"]["progress"] == "0%"
    assert doc["status"]["imageCacheId"].startswith("imc-")
    assert str(uuid.UUID(doc["metadata"]["uid"])) == doc["metadata"]["uid"]
    assert doc["metadata"]["generation"] == 1 and doc["status"]["observedGeneration"] == 0
    assert int(doc["metadata"]["resourceVersion"]) > 0
    assert doc["spec"]["images"] == [IMAGE]


# -- create, then the build fails in the background ----------------------------------------------


def test_post_yaml_and_json_answer_creating_then_the_builds_fail_with_an_event(caches: Caches) -> None:
    runner = BuildRunner(Builder(caches), workers=2)
    api = ImageCacheAPI(caches, runner)
    try:
        resp, web = post_yaml(api, cache_yaml("web", imageCacheSize=25, retentionDays=7))
        assert resp.status == 201 and resp.content_type == "application/json"
        assert_creating_object(web, "web")
        assert web["spec"]["imageCacheSize"] == 25 and web["spec"]["retentionDays"] == 7
        assert web["metadata"]["annotations"]["k8s.aliyun.com/plain-http-registry"] == DEAD_REGISTRY

        resp, api_obj = post_json(api, cache_obj("api"))
        assert resp.status == 201
        assert_creating_object(api_obj, "api")
        assert api_obj["spec"]["imageCacheSize"] == 20
    finally:
        runner.shutdown(wait=True)

    assert runner.pending == 0
    for name, created in (("web", web), ("api", api_obj)):
        resp, doc = call(api, "GET", f"{PREFIX}/{name}")
        assert resp.status == 200
        status = doc["status"]
        assert status["phase"] == FAILED
        assert status["imageCacheId"] == created["status"]["imageCacheId"]
        assert "connection refused" in status["message"]
        assert status["expireDateTime"]  # a failed creation expires after 24 hours
        last = status["events"][-1]
        assert last["type"] == "Warning" and last["reason"] == "Failed" and "connection refused" in last["message"]
        assert status["events"][0]["reason"] == "Creating"


def test_post_without_content_type_sniffs_json_and_yaml(api: ImageCacheAPI, held: HeldBuilds) -> None:
    resp, doc = call(api, "POST", PREFIX, json.dumps(cache_obj("from-json")))
    assert resp.status == 201 and doc["metadata"]["name"] == "from-json"
    resp, doc = call(api, "POST", PREFIX, cache_yaml("from-yaml"))
    assert resp.status == 201 and doc["metadata"]["name"] == "from-yaml"
    resp, doc = call(api, "POST", PREFIX, cache_yaml("x-yaml"), {"content-type": "text/yaml; charset=utf-8"})
    assert resp.status == 201 and doc["metadata"]["name"] == "x-yaml"
    assert [name for name, _ in held.submitted] == ["from-json", "from-yaml", "x-yaml"]


def test_post_records_cloud_only_annotations_as_having_no_effect(api: ImageCacheAPI) -> None:
    resp, doc = post_yaml(api, yaml.safe_dump(cache_obj("web", {"k8s.aliyun.com/vswitch-ids": "vsw-1",
                                                                 "k8s.aliyun.com/security-group-id": "sg-1",
                                                                 "k8s.aliyun.com/eci-vswitch": "vsw-1"})))
    assert resp.status == 201
    ignored = [e for e in doc["status"]["events"] if e["reason"] == "AnnotationIgnored"]
    assert len(ignored) == 1
    assert "vswitch-ids" in ignored[0]["message"] and "security-group-id" in ignored[0]["message"]
    [unknown] = [e for e in doc["status"]["events"] if e["reason"] == "UnknownAnnotation"]
    assert unknown["type"] == "Warning" and "k8s.aliyun.com/eci-vswitch" in unknown["message"]


def test_post_with_null_optional_fields_takes_the_defaults(api: ImageCacheAPI) -> None:
    resp, doc = post_json(api, cache_obj("web", imageCacheSize=None, retentionDays=None, imagePullSecrets=None))
    assert resp.status == 201, doc
    assert doc["spec"]["imageCacheSize"] == 20 and "retentionDays" not in doc["spec"]
    assert doc["status"]["expireDateTime"] is None


def test_dry_run_validates_without_creating(api: ImageCacheAPI, caches: Caches, held: HeldBuilds) -> None:
    before = snapshot(caches)
    resp, doc = post_yaml(api, cache_yaml("web"), f"{PREFIX}?dryRun=All")
    assert resp.status == 201
    assert doc["kind"] == "ImageCache" and doc["metadata"]["name"] == "web" and doc["status"]["phase"] == ""
    assert snapshot(caches) == before and held.submitted == []

    resp, doc = post_yaml(api, cache_yaml("web", imageCacheSize=19), f"{PREFIX}?dryRun=All")
    failure(doc, 422, "Invalid", "web")
    resp, doc = post_yaml(api, cache_yaml("web"), f"{PREFIX}?dryRun=Some")
    failure(doc, 400, "BadRequest")
    assert snapshot(caches) == before


# -- reading and deleting ---------------------------------------------------------------------------


def test_list_shape_empty_and_with_items(api: ImageCacheAPI) -> None:
    resp, doc = call(api, "GET")
    assert resp.status == 200
    assert doc == {"apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCacheList",
                   "metadata": {"resourceVersion": "0"}, "items": []}

    post_yaml(api, cache_yaml("web"))
    post_json(api, cache_obj("api"))
    resp, doc = call(api, "GET", PREFIX + "/")
    assert resp.status == 200 and doc["kind"] == "ImageCacheList"
    assert [i["metadata"]["name"] for i in doc["items"]] == ["api", "web"]
    assert all(i["kind"] == "ImageCache" and i["status"]["phase"] == "Creating" for i in doc["items"])


def test_get_one_returns_the_object_and_yaml_on_request(api: ImageCacheAPI) -> None:
    _, created = post_yaml(api, cache_yaml("web"))
    resp, doc = call(api, "GET", f"{PREFIX}/web")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert doc["metadata"] == created["metadata"] and doc["spec"] == created["spec"]
    assert doc["status"]["imageCacheId"] == created["status"]["imageCacheId"]

    resp, doc = call(api, "GET", f"{PREFIX}/web", headers={"Accept": "application/yaml"})
    assert resp.status == 200 and resp.content_type == "application/yaml"
    assert doc["metadata"]["name"] == "web"
    resp, _ = call(api, "GET", f"{PREFIX}/web", headers={"Accept": "application/json, application/yaml;q=0.5"})
    assert resp.content_type == "application/json"


def test_get_missing_is_a_not_found_status(api: ImageCacheAPI) -> None:
    resp, doc = call(api, "GET", f"{PREFIX}/nope")
    assert resp.status == 404 and resp.content_type == "application/json"
    assert doc == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'imagecaches.eci.alibabacloud.com "nope" not found', "reason": "NotFound",
        "details": {"name": "nope", "group": "eci.alibabacloud.com", "kind": "imagecaches"}, "code": 404,
    }


def test_delete_answers_a_success_status_and_the_cache_is_gone(api: ImageCacheAPI, caches: Caches) -> None:
    _, created = post_yaml(api, cache_yaml("web"))
    post_yaml(api, cache_yaml("keep"))
    resp, doc = call(api, "DELETE", f"{PREFIX}/web")
    assert resp.status == 200
    assert doc == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
        "details": {"name": "web", "group": "eci.alibabacloud.com", "kind": "imagecaches",
                    "uid": created["metadata"]["uid"]},
    }
    assert [c.name for c in caches.list()] == ["keep"]
    resp, doc = call(api, "GET", f"{PREFIX}/web")
    failure(doc, 404, "NotFound", "web")


def test_delete_missing_is_not_found(api: ImageCacheAPI) -> None:
    resp, doc = call(api, "DELETE", f"{PREFIX}/nope")
    assert resp.status == 404
    failure(doc, 404, "NotFound", "nope")


# -- refusals ---------------------------------------------------------------------------------------


@pytest.fixture
def one_cache(api: ImageCacheAPI) -> dict[str, Any]:
    """A cache named ``web`` that exists before the refused request."""
    resp, doc = post_yaml(api, cache_yaml("web"))
    assert resp.status == 201
    return doc


BIG = b"a: " + b"x" * (2 * MAX_BODY_BYTES) + b"\n"

REFUSED: list[tuple[str, str, str, bytes | str, dict[str, str], int, str]] = [
    # id, method, path, body, headers, code, reason
    ("bad-yaml", "POST", PREFIX, "metadata: {name: [web\nspec: :\n", {"Content-Type": "application/yaml"},
     400, "BadRequest"),
    ("bad-json", "POST", PREFIX, '{"apiVersion": ', {"Content-Type": "application/json"}, 400, "BadRequest"),
    ("json-array", "POST", PREFIX, "[1, 2]", {"Content-Type": "application/json"}, 400, "BadRequest"),
    ("empty-body", "POST", PREFIX, "", {}, 400, "BadRequest"),
    ("not-utf8", "POST", PREFIX, b"\xff\xfe\xfa", {"Content-Type": "application/yaml"}, 400, "BadRequest"),
    ("two-documents", "POST", PREFIX, "a: 1\n---\nb: 2\n", {"Content-Type": "application/yaml"}, 400, "BadRequest"),
    ("yaml-alias", "POST", PREFIX, "x: &a [1, 2]\ny: *a\n", {"Content-Type": "application/yaml"}, 400, "BadRequest"),
    ("deep-yaml", "POST", PREFIX, "[" * 5000, {"Content-Type": "application/yaml"}, 400, "BadRequest"),
    ("deep-json", "POST", PREFIX, "[" * 200000, {"Content-Type": "application/json"}, 400, "BadRequest"),
    ("size-19", "POST", PREFIX, cache_yaml("new", imageCacheSize=19), {}, 422, "Invalid"),
    ("unknown-imc-annotation", "POST", PREFIX,
     yaml.safe_dump(cache_obj("new", {"k8s.aliyun.com/imc-enable-turbo": "true"})), {}, 422, "Invalid"),
    ("bad-object-name", "POST", PREFIX, cache_yaml("Not_A_Name"), {}, 422, "Invalid"),
    ("wrong-kind", "POST", PREFIX, json.dumps({**cache_obj("new"), "kind": "Pod"}), {}, 422, "Invalid"),
    ("missing-secret", "POST", PREFIX, cache_yaml("new", imagePullSecrets=["default:nope"]), {}, 422, "Invalid"),
    ("duplicate", "POST", PREFIX, cache_yaml("web"), {}, 409, "AlreadyExists"),
    ("two-mib", "POST", PREFIX, BIG, {"Content-Type": "application/yaml"}, 413, "RequestEntityTooLarge"),
    ("xml", "POST", PREFIX, "<ImageCache/>", {"Content-Type": "application/xml"}, 415, "UnsupportedMediaType"),
    ("put-item-creating", "PUT", f"{PREFIX}/web", cache_yaml("web", retentionDays=3), {}, 409, "Conflict"),
    ("patch-item-strategic", "PATCH", f"{PREFIX}/web", "{}", {"Content-Type": "application/strategic-merge-patch+json"},
     415, "UnsupportedMediaType"),
    ("options-item", "OPTIONS", f"{PREFIX}/web", "", {}, 405, "MethodNotAllowed"),
    ("delete-collection", "DELETE", PREFIX, "", {}, 405, "MethodNotAllowed"),
    ("post-item", "POST", f"{PREFIX}/web", cache_yaml("web"), {}, 405, "MethodNotAllowed"),
    ("sub-path", "GET", f"{PREFIX}/web/logs", "", {}, 404, "NotFound"),
    ("sub-path-delete", "DELETE", f"{PREFIX}/web/x", "", {}, 404, "NotFound"),
    ("dot-dot", "DELETE", f"{PREFIX}/..", "", {}, 404, "NotFound"),
    ("bad-name-get", "GET", f"{PREFIX}/Bad_Name", "", {}, 404, "NotFound"),
    ("bad-name-delete", "DELETE", f"{PREFIX}/-web", "", {}, 404, "NotFound"),
    ("long-name", "DELETE", f"{PREFIX}/{'a' * 64}", "", {}, 404, "NotFound"),
    ("other-prefix", "GET", "/apis/eci.alibabacloud.com/v1/imagecachesx", "", {}, 404, "NotFound"),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "code", "reason"),
                         [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_requests_answer_a_status_and_write_nothing(
        api: ImageCacheAPI, caches: Caches, held: HeldBuilds, one_cache: dict[str, Any], method: str, path: str,
        body: bytes | str, headers: dict[str, str], code: int, reason: str) -> None:
    before = snapshot(caches)
    resp, doc = call(api, method, path, body, headers)
    assert resp.status == code
    failure(doc, code, reason)
    assert "Traceback" not in doc["message"]
    assert len(doc["message"]) < 2000  # a refused field is quoted, never echoed whole
    records, files = snapshot(caches)
    assert records == before[0]
    if reason != "AlreadyExists":
        # A duplicate gets as far as taking a build lock (an empty lock file that the
        # next gc removes); every other refusal happens before any write at all.
        assert files == before[1]
    assert [name for name, _ in held.submitted] == ["web"]


def test_invalid_size_names_the_field_and_its_limits(api: ImageCacheAPI) -> None:
    _, doc = post_yaml(api, cache_yaml("web", imageCacheSize=19))
    failure(doc, 422, "Invalid", "web")
    assert "imageCacheSize" in doc["message"] and "20" in doc["message"] and "32768" in doc["message"]


def test_unknown_imc_annotation_is_named(api: ImageCacheAPI) -> None:
    _, doc = post_yaml(api, yaml.safe_dump(cache_obj("web", {"k8s.aliyun.com/imc-enable-turbo": "true"})))
    failure(doc, 422, "Invalid", "web")
    assert "k8s.aliyun.com/imc-enable-turbo" in doc["message"]


def test_duplicate_keeps_the_first_cache(api: ImageCacheAPI, caches: Caches, one_cache: dict[str, Any]) -> None:
    resp, doc = post_json(api, cache_obj("web", imageCacheSize=40))
    assert resp.status == 409
    failure(doc, 409, "AlreadyExists", "web")
    assert doc["message"] == 'imagecaches.eci.alibabacloud.com "web" already exists'
    cache = caches.get("web")
    assert cache.id == one_cache["status"]["imageCacheId"] and cache.spec.size_gib == 20


def test_method_not_allowed_says_what_is(api: ImageCacheAPI) -> None:
    resp, doc = call(api, "POST", f"{PREFIX}/web", cache_yaml("web"))
    failure(doc, 405, "MethodNotAllowed")
    assert resp.headers["Allow"] == "GET, PUT, PATCH, DELETE" and "GET, PUT, PATCH, DELETE" in doc["message"]
    resp, doc = call(api, "PATCH", PREFIX, "{}")
    assert resp.status == 405 and resp.headers["Allow"] == "GET, POST"


def test_a_bad_name_in_the_path_is_never_looked_up(api: ImageCacheAPI, caches: Caches,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def untouchable(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused name reached the record store")

    for target in (caches, caches._db):
        for attr in ("get", "delete", "list"):
            monkeypatch.setattr(target, attr, untouchable)
    for method in ("GET", "DELETE"):
        for raw in ("Web", "web_1", "-web", "web-", "a" * 64, "%2e%2e", "web%2Fx", "caches.db", " web"):
            resp, doc = call(api, method, f"{PREFIX}/{raw}")
            assert resp.status == 404, (method, raw)
            failure(doc, 404, "NotFound")
            assert "not a valid name" in doc["message"]


def test_quota_exceeded_is_forbidden(api: ImageCacheAPI, caches: Caches, held: HeldBuilds) -> None:
    Settings(max_manual_caches=1).save(caches.home.settings)
    assert post_yaml(api, cache_yaml("web"))[0].status == 201
    before = snapshot(caches)[0]
    resp, doc = post_yaml(api, cache_yaml("api"))
    assert resp.status == 403
    failure(doc, 403, "Forbidden", "api")
    assert "quota exceeded" in doc["message"]
    assert snapshot(caches)[0] == before
    resp, doc = post_yaml(api, cache_yaml("api"), f"{PREFIX}?dryRun=All")
    failure(doc, 403, "Forbidden", "api")
    assert [name for name, _ in held.submitted] == ["web"]


def test_cache_state_error_is_a_conflict(api: ImageCacheAPI, caches: Caches,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def busy(*args: object, **kwargs: object) -> None:
        raise CacheStateError("a build of this image cache is still running")

    monkeypatch.setattr(caches, "create", busy)
    _, doc = post_yaml(api, cache_yaml("web"))
    failure(doc, 409, "Conflict", "web")
    assert "still running" in doc["message"]


def test_an_unexpected_error_is_a_generic_internal_error(api: ImageCacheAPI, caches: Caches,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("/srv/imc/home/secrets/default:reg password=hunter2")

    monkeypatch.setattr(caches, "list", broken)
    monkeypatch.setattr(caches, "get", broken)
    for path in (PREFIX, f"{PREFIX}/web"):
        resp, doc = call(api, "GET", path)
        assert resp.status == 500
        failure(doc, 500, "InternalError")
        text = resp.body.decode()
        assert "hunter2" not in text and "/srv/imc" not in text and "Traceback" not in text
        assert "RuntimeError" not in text


def test_refused_by_a_closed_runner_leaves_no_cache(caches: Caches) -> None:
    runner = BuildRunner(Builder(caches), workers=1)
    runner.shutdown(wait=True)
    api = ImageCacheAPI(caches, runner)
    _, doc = post_yaml(api, cache_yaml("web"))
    failure(doc, 503, "ServiceUnavailable", "web")
    assert caches.list() == []


# -- the runner ------------------------------------------------------------------------------------


class GatedBuilder(Builder):
    """Builds that wait for the test to open a gate, then end Failed (no network)."""

    def __init__(self, caches: Caches) -> None:
        super().__init__(caches)
        self.gate = threading.Event()
        self.started = threading.Event()
        self.built: list[str] = []

    def build(self, name: str, lease: BuildLease, on_pull: object = None, on_event: object = None) -> ImageCache:
        self.started.set()
        assert self.gate.wait(timeout=30)
        self.built.append(name)
        try:
            return self.caches.fail(name, "gated test build")
        except NotFoundLocalError:
            raise CacheDeletedError(f"image cache {name} was deleted while it was being built") from None
        finally:
            lease.release()


def test_runner_shutdown_without_wait_cancels_queued_builds_and_frees_their_leases(tmp_path: Path) -> None:
    caches = Caches(tmp_path / "home")
    builder = GatedBuilder(caches)
    runner = BuildRunner(builder, workers=1)
    _, lease_a = caches.create("a", _spec())
    _, lease_b = caches.create("b", _spec())
    runner.submit("a", lease_a)
    assert builder.started.wait(timeout=30)
    runner.submit("b", lease_b)  # queued behind "a", which holds the only worker
    runner.shutdown(wait=False)
    # "b" never ran: its lease is free again, so a reader marks it Failed rather than
    # leaving it Creating forever.
    assert caches.get("b").phase == FAILED
    builder.gate.set()
    runner.shutdown(wait=True)  # let "a" finish before tmp_path goes away
    assert builder.built == ["a"]
    assert caches.get("a").phase == FAILED
    with pytest.raises(RunnerClosedError):
        runner.submit("c", BuildLease(tmp_path / "c.lock"))


def test_runner_survives_a_cache_deleted_while_queued(tmp_path: Path) -> None:
    caches = Caches(tmp_path / "home")
    builder = GatedBuilder(caches)
    builder.gate.set()
    with BuildRunner(builder, workers=1) as runner:
        _, lease = caches.create("a", _spec())
        caches.delete("a")
        runner.submit("a", lease)
    assert runner.pending == 0
    with pytest.raises(NotFoundLocalError):
        caches.get("a")


def _spec() -> CacheSpec:
    return spec_from_object(cache_obj("x"))[1]
