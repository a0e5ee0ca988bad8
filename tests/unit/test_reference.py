"""Image references: docker's normalisation, and malformed references refused with a reason."""

from __future__ import annotations

import pytest

from builder.digest import Digest
from builder.errors import BadReferenceError, ValidationError
from builder.reference import Reference, parse, valid_repository

HEX = "a" * 64
DIGEST = f"sha256:{HEX}"


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("nginx", "docker.io", "library/nginx", "latest", None),
        ("nginx:1.7.9", "docker.io", "library/nginx", "1.7.9", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("user/app:v2", "docker.io", "user/app", "v2", None),
        ("docker.io/nginx", "docker.io", "library/nginx", "latest", None),
        ("index.docker.io/x", "docker.io", "library/x", "latest", None),
        ("registry-1.docker.io/team/x:1", "docker.io", "team/x", "1", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/app:1", "localhost:5000", "app", "1", None),
        ("host:5000/team/app:1.0", "host:5000", "team/app", "1.0", None),
        ("quay.io/org/sub/app:v1_2-3", "quay.io", "org/sub/app", "v1_2-3", None),
        ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b", "latest", None),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
        ("Host/app", "Host", "app", "latest", None),  # upper case in the first part: a registry
        ("a__b/c.d-e--f", "docker.io", "a__b/c.d-e--f", "latest", None),
        (f"repo@{DIGEST}", "docker.io", "library/repo", None, DIGEST),
        (f"host:5000/app@{DIGEST}", "host:5000", "app", None, DIGEST),
        (f"nginx:1.25@{DIGEST}", "docker.io", "library/nginx", "1.25", DIGEST),
        ("x:" + "t" * 128, "docker.io", "library/x", "t" * 128, None),
    ],
)
def test_normalisation(text, registry, repository, tag, digest):
    ref = parse(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
    assert ref.digest == (Digest.parse(digest) if digest else None)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("nginx", "docker.io/library/nginx:latest"),
        ("nginx:1.7.9", "docker.io/library/nginx:1.7.9"),
        ("localhost:5000/app:1", "localhost:5000/app:1"),
        (f"repo@{DIGEST}", f"docker.io/library/repo@{DIGEST}"),
        (f"nginx:1.25@{DIGEST}", f"docker.io/library/nginx:1.25@{DIGEST}"),
    ],
)
def test_str_is_the_normalised_form_and_round_trips(text, shown):
    assert str(parse(text)) == shown
    assert parse(shown) == parse(text)


def test_api_host_of_docker_hub_differs_from_its_name():
    ref = parse("nginx")
    assert ref.name == "docker.io/library/nginx"
    assert ref.api_host == "registry-1.docker.io"
    assert parse("host:5000/app").api_host == "host:5000"
    assert parse("localhost/app").api_host == "localhost"


def test_identifier_prefers_the_digest_over_the_tag():
    assert parse("nginx:1.25").identifier == "1.25"
    assert parse(f"nginx:1.25@{DIGEST}").identifier == DIGEST
    assert Reference("docker.io", "library/nginx").identifier == "latest"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        (" nginx", "spaces"),
        ("nginx ", "spaces"),
        ("ng inx", "bad repository"),
        ("Nginx", "bad repository"),
        ("user/App", "bad repository"),
        ("nginx:", "bad tag"),
        ("nginx:-x", "bad tag"),
        ("nginx:.x", "bad tag"),
        ("nginx:a+b", "bad tag"),
        ("x:" + "t" * 129, "bad tag"),
        ("nginx@sha256:abc", "sha256 takes 64 hex digits"),
        (f"nginx@sha256:{HEX}0", "sha256 takes 64 hex digits"),
        (f"nginx@sha256:{HEX.upper()}", "invalid digest"),
        (f"nginx@md5:{HEX}", "invalid digest"),
        ("nginx@", "invalid digest"),
        ("a//b", "bad repository"),
        ("-a", "bad repository"),
        ("a-/b", "bad repository"),
        ("a/b/", "bad repository"),
        (":tag", "no repository"),
        ("host_name:5000/app", "bad registry"),  # a domain by its ":", and "_" is not allowed in one
        ("-bad.host/app", "bad registry"),
        ("host:5000/" + "a" * 250, "longer than 255"),
        # a newline inside (not at the end, which the strip check catches) is refused too
        ("nginx\n:latest", "bad repository"),
        ("host:5000\n/app:1", "bad registry"),
        ("host:5000/app\n:1", "bad repository"),
        (f"nginx@sha256:{HEX}\n", "spaces"),
        (f"nginx:1.0\n@{DIGEST}", "bad tag"),
    ],
)
def test_malformed_references_name_the_problem(text, problem):
    with pytest.raises(BadReferenceError) as info:
        parse(text)
    assert problem in info.value.message
    assert repr(text) in info.value.message  # the message quotes what was given
    assert isinstance(info.value, ValidationError)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(("name", "ok"), [
    ("library/nginx", True), ("a", True), ("a.b_c__d-e", True),
    ("A", False), ("a//b", False), ("library/nginx\n", False), ("/a", False), ("a/", False), ("", False), ("a" * 256, False),
])
def test_valid_repository(name, ok):
    assert valid_repository(name) is ok
