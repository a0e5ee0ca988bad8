"""Digests, and manifests parsed from their exact bytes."""

from __future__ import annotations

import hashlib
import json

import pytest

from builder import oci
from builder.digest import Digest, Verifier, hash_file, verify_bytes
from builder.errors import BadReferenceError, DigestMismatchError, UnsupportedError, ValidationError
from builder.oci import Descriptor, Index, Manifest, Platform, parse_manifest

DATA = b"hello, content-addressed world\n"
SHA256 = hashlib.sha256(DATA).hexdigest()
SHA512 = hashlib.sha512(DATA).hexdigest()


# -- digests ---------------------------------------------------------------------------


def test_digest_parse_valid_sha256_and_sha512():
    d = Digest.parse(f"sha256:{SHA256}")
    assert (d.algorithm, d.hex) == ("sha256", SHA256)
    assert str(d) == f"sha256:{SHA256}"
    assert d.short == SHA256[:12]
    d512 = Digest.parse(f"sha512:{SHA512}")
    assert (d512.algorithm, len(d512.hex)) == ("sha512", 128)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (f"sha512:{SHA256}", "sha512 takes 128 hex digits"),  # a sha256-length hex under sha512
        (f"sha256:{SHA512}", "sha256 takes 64 hex digits"),
        (f"sha256:{SHA256[:-1]}", "sha256 takes 64 hex digits"),
        (f"sha256:{SHA256.upper()}", "invalid digest"),
        (f"SHA256:{SHA256}", "invalid digest"),
        (f"md5:{SHA256}", "invalid digest"),
        (SHA256, "invalid digest"),
        (f"sha256:{SHA256[:-1]}g", "invalid digest"),
        (f"sha256:{SHA256}\n", "invalid digest"),
        ("sha256:", "invalid digest"),
        ("", "invalid digest"),
        (f" sha256:{SHA256}", "invalid digest"),
        (f"sha256:../../{SHA256[:58]}", "invalid digest"),
    ],
)
def test_digest_parse_refuses(text, problem):
    with pytest.raises(BadReferenceError) as info:
        Digest.parse(text)
    assert problem in info.value.message


def test_digest_of_and_ordering():
    assert Digest.of(DATA) == Digest("sha256", SHA256)
    assert Digest.of(DATA, "sha512") == Digest("sha512", SHA512)
    assert sorted([Digest("sha256", "b" * 64), Digest("sha256", "a" * 64)])[0].hex == "a" * 64


def test_verify_bytes():
    verify_bytes(DATA, Digest("sha256", SHA256))
    verify_bytes(DATA, Digest("sha512", SHA512))
    with pytest.raises(DigestMismatchError) as info:
        verify_bytes(DATA + b"x", Digest("sha256", SHA256), what="layer")
    assert "layer digest mismatch" in info.value.message
    assert SHA256 in info.value.message
    assert info.value.exit_code == 4


def test_verifier_checks_streamed_pieces_size_and_digest():
    whole = Verifier(Digest("sha256", SHA256), len(DATA))
    for i in range(0, len(DATA), 7):
        whole.update(memoryview(DATA)[i:i + 7])
    assert whole.matches() and whole.actual() == Digest("sha256", SHA256)
    whole.verify()

    short = Verifier(Digest("sha256", SHA256), len(DATA), what="part p")
    short.update(DATA[:-1])
    assert not short.matches()
    with pytest.raises(DigestMismatchError, match=rf"part p: got {len(DATA) - 1} bytes, expected {len(DATA)}"):
        short.verify()

    with pytest.raises(DigestMismatchError, match=f"is longer than its {len(DATA)} bytes"):
        short.update(b"xy")  # refused before it is counted: the bytes seen stay as they were
    assert short.count == len(DATA) - 1

    wrong = Verifier(Digest("sha256", SHA256), len(DATA))
    wrong.update(DATA[:-1] + b"?")
    with pytest.raises(DigestMismatchError, match=f"blob sha256:{SHA256} digest mismatch"):
        wrong.verify()
    wrong.reset()
    wrong.update(DATA)
    wrong.verify()


def test_hash_file_streams_in_chunks(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 1000  # 256000 bytes, several chunks of 4096
    path.write_bytes(data)
    digest, size = hash_file(str(path), chunk=4096)
    assert size == len(data)
    assert digest == Digest.of(data)
    digest512, _ = hash_file(str(path), "sha512")
    assert digest512 == Digest.of(data, "sha512")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert hash_file(str(empty)) == (Digest.of(b""), 0)


# -- manifests -------------------------------------------------------------------------


def desc(media_type: str, data: bytes = b"x", **extra) -> dict:
    return {"mediaType": media_type, "digest": f"sha256:{hashlib.sha256(data).hexdigest()}",
            "size": len(data), **extra}


def manifest_doc(media_type: str | None = oci.OCI_MANIFEST, layers: int = 2) -> dict:
    doc: dict = {
        "schemaVersion": 2,
        "config": desc(oci.OCI_CONFIG, b"config"),
        "layers": [desc("application/vnd.oci.image.layer.v1.tar+gzip", f"layer{i}".encode())
                   for i in range(layers)],
    }
    if media_type:
        doc["mediaType"] = media_type
    return doc


def index_entry(os_: str, arch: str, variant: str | None = None, data: bytes | None = None,
                annotations: dict | None = None, media_type: str = oci.OCI_MANIFEST) -> dict:
    platform = {"os": os_, "architecture": arch}
    if variant:
        platform["variant"] = variant
    entry = desc(media_type, data or f"{os_}/{arch}/{variant}".encode(), platform=platform)
    if annotations:
        entry["annotations"] = annotations
    return entry


def index_doc(entries: list[dict], media_type: str = oci.OCI_INDEX) -> dict:
    return {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}


def raw(doc: dict) -> bytes:
    return json.dumps(doc, indent=3).encode()


def test_oci_manifest_keeps_exact_bytes():
    data = raw(manifest_doc())
    m = parse_manifest(data)
    assert isinstance(m, Manifest)
    assert m.media_type == oci.OCI_MANIFEST
    assert m.raw == data
    assert m.digest == Digest.of(data)  # the bytes as sent, not a re-serialisation
    assert m.config.digest == Digest.of(b"config")
    assert [layer.digest for layer in m.layers] == [Digest.of(b"layer0"), Digest.of(b"layer1")]
    assert m.blobs() == (m.config, *m.layers)
    assert oci.layer_compression(m.layers[0].media_type) == "gzip"


def test_docker_v2_manifest():
    doc = manifest_doc(oci.DOCKER_MANIFEST)
    doc["config"]["mediaType"] = oci.DOCKER_CONFIG
    m = parse_manifest(raw(doc))
    assert isinstance(m, Manifest)
    assert m.media_type == oci.DOCKER_MANIFEST
    assert m.config.media_type == oci.DOCKER_CONFIG


def test_manifest_without_media_type_field_is_detected_from_its_shape():
    m = parse_manifest(raw(manifest_doc(media_type=None)), header_type="text/plain")
    assert isinstance(m, Manifest) and m.media_type == oci.OCI_MANIFEST
    i = parse_manifest(raw({"schemaVersion": 2, "manifests": []}))
    assert isinstance(i, Index) and i.media_type == oci.OCI_INDEX


def test_media_type_field_wins_over_the_header():
    m = parse_manifest(raw(manifest_doc(oci.DOCKER_MANIFEST)), header_type=oci.OCI_MANIFEST)
    assert m.media_type == oci.DOCKER_MANIFEST


@pytest.mark.parametrize("media_type", [oci.OCI_INDEX, oci.DOCKER_LIST])
def test_index_and_docker_list(media_type):
    entries = [index_entry("linux", "amd64"), index_entry("linux", "arm64", "v8")]
    i = parse_manifest(raw(index_doc(entries, media_type)))
    assert isinstance(i, Index)
    assert i.media_type == media_type
    assert [str(d.platform) for d in i.manifests] == ["linux/amd64", "linux/arm64/v8"]
    assert i.digest == Digest.of(i.raw)


@pytest.mark.parametrize(
    "data",
    [
        raw({"schemaVersion": 1, "name": "library/x", "tag": "latest", "fsLayers": [], "history": []}),
        raw({"schemaVersion": 1, "mediaType": oci.DOCKER_SCHEMA1[0], "fsLayers": []}),
        raw({"schemaVersion": 1, "mediaType": oci.DOCKER_SCHEMA1[1], "fsLayers": [], "signatures": []}),
    ],
)
def test_schema1_is_refused(data):
    with pytest.raises(UnsupportedError) as info:
        parse_manifest(data)
    assert "schema 1" in info.value.message
    assert info.value.exit_code == 7


def test_schema1_declared_by_header_only_is_refused():
    with pytest.raises(UnsupportedError, match="schema 1"):
        parse_manifest(b'{"name": "x", "fsLayers": []}', header_type=oci.DOCKER_SCHEMA1[1] + "; charset=utf-8")


def test_oversized_manifest_is_refused_before_parsing():
    doc = manifest_doc()
    doc["annotations"] = {"pad": "x" * oci.MAX_MANIFEST_SIZE}
    with pytest.raises(UnsupportedError) as info:
        parse_manifest(raw(doc))
    assert "cap" in info.value.message
    # right at the cap is fine
    small = raw(manifest_doc())
    padded = small[:-1] + b" " * (oci.MAX_MANIFEST_SIZE - len(small)) + b"}"
    assert len(padded) == oci.MAX_MANIFEST_SIZE
    assert isinstance(parse_manifest(padded), Manifest)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (raw({"schemaVersion": 2, "mediaType": "application/vnd.example.thing+json", "layers": []}),
         "unsupported manifest media type 'application/vnd.example.thing+json'"),
        (raw({"schemaVersion": 2}), "unsupported manifest media type ''"),
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
    ],
)
def test_unknown_or_garbage_is_refused(data, problem):
    with pytest.raises(UnsupportedError) as info:
        parse_manifest(data)
    assert problem in info.value.message


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda d: d.pop("layers"), "no layers list"),
        (lambda d: d.update(layers={"a": 1}), "no layers list"),
        (lambda d: d.pop("config"), "not an object"),
        (lambda d: d["config"].update(digest="sha256:abc"), "sha256 takes 64 hex digits"),
        (lambda d: d["config"].update(digest="sha256:short"), "invalid digest"),
        (lambda d: d["config"].pop("digest"), "invalid digest"),
        (lambda d: d["layers"][0].update(size=-1), "bad size -1"),
        (lambda d: d["layers"][0].update(size="12"), "bad size '12'"),
        (lambda d: d["layers"][0].update(size=True), "bad size True"),
        (lambda d: d["layers"][0].update(size=1.5), "bad size 1.5"),
        (lambda d: d["layers"].append("sha256:abc"), "not an object"),
    ],
)
def test_malformed_descriptors_are_refused(mutate, problem):
    doc = manifest_doc()
    mutate(doc)
    with pytest.raises(UnsupportedError) as info:
        parse_manifest(raw(doc))
    assert "malformed manifest" in info.value.message
    assert problem in info.value.message


def test_index_without_manifests_list_is_refused():
    with pytest.raises(UnsupportedError, match="no manifests list"):
        parse_manifest(raw({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": "x"}))


def test_descriptor_round_trips_to_json():
    obj = index_entry("linux", "arm", "v7", annotations={"k": "v"})
    d = Descriptor.from_json(obj)
    assert d.platform == Platform("linux", "arm", "v7")
    assert d.annotations == {"k": "v"}
    assert d.to_json() == obj


# -- platform selection ----------------------------------------------------------------

ATTESTATION = {"vnd.docker.reference.type": "attestation-manifest",
               "vnd.docker.reference.digest": f"sha256:{'1' * 64}"}


def buildkit_index() -> Index:
    entries = [
        index_entry("linux", "amd64", data=b"amd64"),
        index_entry("linux", "arm64", "v8", data=b"arm64"),
        index_entry("linux", "arm", "v6", data=b"armv6"),
        index_entry("linux", "arm", "v7", data=b"armv7"),
        index_entry("unknown", "unknown", data=b"att1", annotations=ATTESTATION),
        index_entry("unknown", "unknown", data=b"att2", annotations=ATTESTATION),
    ]
    node = parse_manifest(raw(index_doc(entries)))
    assert isinstance(node, Index)
    return node


@pytest.mark.parametrize(
    ("want", "picked"),
    [
        ("linux/amd64", b"amd64"),
        ("linux/arm64", b"arm64"),  # no variant asked: any variant does
        ("linux/arm64/v8", b"arm64"),
        ("linux/arm/v7", b"armv7"),  # not the v6 listed first
        ("linux/arm/v6", b"armv6"),
    ],
)
def test_select_platform(want, picked):
    assert buildkit_index().select(Platform.parse(want)).digest == Digest.of(picked)


def test_select_entry_without_variant_matches_a_wanted_variant():
    node = parse_manifest(raw(index_doc([index_entry("linux", "arm64", data=b"plain")])))
    assert node.select(Platform.parse("linux/arm64/v8")).digest == Digest.of(b"plain")


def test_select_never_picks_an_attestation():
    only_attestations = parse_manifest(raw(index_doc([
        index_entry("unknown", "unknown", data=b"a", annotations=ATTESTATION),
        # an attestation even if its platform looks real
        index_entry("linux", "amd64", data=b"b", annotations=ATTESTATION),
    ])))
    assert all(d.is_attestation for d in only_attestations.manifests)
    with pytest.raises(UnsupportedError) as info:
        only_attestations.select(Platform.parse("linux/amd64"))
    assert "has: none" in info.value.message
    with pytest.raises(UnsupportedError):
        only_attestations.select(Platform("unknown", "unknown"))


def test_select_error_lists_available_platforms():
    with pytest.raises(UnsupportedError) as info:
        buildkit_index().select(Platform.parse("linux/s390x"))
    message = info.value.message
    assert "linux/s390x" in message
    assert "has: linux/amd64, linux/arm64/v8, linux/arm/v6, linux/arm/v7" in message
    assert "unknown" not in message
    with pytest.raises(UnsupportedError, match="windows/amd64"):
        buildkit_index().select(Platform.parse("windows/amd64"))
    with pytest.raises(UnsupportedError, match=r"linux/arm64/v9"):
        buildkit_index().select(Platform.parse("linux/arm64/v9"))


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "linux/amd64/v8/x", "", "linux//v8"])
def test_platform_parse_errors(text):
    with pytest.raises(ValidationError) as info:
        Platform.parse(text)
    assert "want os/arch[/variant]" in info.value.message
    assert repr(text) in info.value.message


def test_platform_parse_and_str():
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert str(Platform.parse("linux/amd64")) == "linux/amd64"
    assert Platform.parse("linux/amd64").to_json() == {"os": "linux", "architecture": "amd64"}
    host = Platform.host()
    assert host.os == "linux" and host.architecture and "/" not in host.architecture


def test_accept_header_lists_index_types():
    for media_type in (oci.OCI_INDEX, oci.DOCKER_LIST, oci.OCI_MANIFEST, oci.DOCKER_MANIFEST):
        assert media_type in oci.ACCEPT
