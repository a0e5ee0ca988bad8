"""Endpoint policy, credentials (docker config, helpers, pull secrets), challenges, tokens."""

from __future__ import annotations

import base64
import json
import os
import stat
import textwrap

import pytest

from builder.errors import AuthError, ValidationError
from builder.registry.auth import (
    Credentials,
    DockerConfig,
    Keychain,
    SecretStore,
    TokenCache,
    docker_config_path,
    parse_challenges,
)
from builder.registry.hosts import HostPolicy, Transport, parse_endpoint_list


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- endpoints and host policy -----------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("a", {"a"}),
        ("a,b:5000", {"a", "b:5000"}),
        ("  a ,  b:5000 ,", {"a", "b:5000"}),
        (" , ,", set()),
        ("", set()),
        (None, set()),
        (["a,b", "c:1"], {"a", "b", "c:1"}),
        ("Registry.Example.COM:443", {"registry.example.com:443"}),
        ("192.168.1.5:5000,192.168.1.5", {"192.168.1.5:5000", "192.168.1.5"}),
        ("[::1]:5000", {"[::1]:5000"}),
    ],
)
def test_parse_endpoint_list(given, expected):
    assert parse_endpoint_list(given) == frozenset(expected)


@pytest.mark.parametrize("bad", ["http://a", "a/b", "a:port", "a b", "a,b c", "a:123456", "a:", "user@a"])
def test_parse_endpoint_list_refuses_invalid_endpoints(bad):
    with pytest.raises(ValidationError) as info:
        parse_endpoint_list(bad)
    assert "invalid registry endpoint" in info.value.message
    assert "want host or host:port" in info.value.message


def test_host_policy_matches_exactly():
    policy = HostPolicy(plain_http=parse_endpoint_list("192.168.1.5:5000"),
                        insecure=parse_endpoint_list("secure.example:8443"))
    assert policy.transport("192.168.1.5:5000") is Transport.HTTP
    assert policy.transport("192.168.1.5") is Transport.HTTPS  # the port is part of the name
    assert policy.transport("192.168.1.5:5001") is Transport.HTTPS
    assert policy.transport("secure.example:8443") is Transport.HTTPS_INSECURE
    assert policy.transport("secure.example") is Transport.HTTPS
    assert policy.transport("SECURE.example:8443") is Transport.HTTPS_INSECURE
    assert policy.transport("localhost:5000") is Transport.HTTPS  # nothing guessed from the name


def test_host_policy_base_url_and_verify(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    policy = HostPolicy(plain_http=frozenset({"plain:5000", "both:1"}),
                        insecure=frozenset({"insecure:5000", "both:1"}), ca_file=str(ca))
    assert policy.base_url("plain:5000") == "http://plain:5000"
    assert policy.base_url("insecure:5000") == "https://insecure:5000"
    assert policy.base_url("other") == "https://other"
    assert policy.base_url("both:1") == "http://both:1"  # plain HTTP wins when listed in both
    assert policy.verify("insecure:5000") is False
    assert policy.verify("other") == str(ca)
    assert HostPolicy().verify("other") is True


def test_host_policy_refuses_a_missing_ca_file(tmp_path):
    with pytest.raises(ValidationError, match="does not exist"):
        HostPolicy(ca_file=str(tmp_path / "nope.pem"))


# -- challenges ----------------------------------------------------------------------------


def test_parse_bearer_challenge():
    header = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
              'scope="repository:library/nginx:pull,push",error="insufficient_scope"')
    (c,) = parse_challenges(header)
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                        "scope": "repository:library/nginx:pull,push", "error": "insufficient_scope"}
    assert c.error == "insufficient_scope"


def test_parse_basic_challenge_and_unquoted_values():
    (c,) = parse_challenges('Basic realm="Registry Realm", charset=UTF-8')
    assert c.scheme == "basic"
    assert c.params == {"realm": "Registry Realm", "charset": "UTF-8"}
    assert c.error is None
    (bare,) = parse_challenges("Basic")
    assert bare.scheme == "basic" and bare.params == {}


def test_parse_multiple_challenges():
    header = 'Basic realm="r1", Bearer realm="https://t.example/token", service="svc", Negotiate'
    challenges = parse_challenges(header)
    assert [c.scheme for c in challenges] == ["basic", "bearer", "negotiate"]
    assert challenges[0].params == {"realm": "r1"}
    assert challenges[1].params == {"realm": "https://t.example/token", "service": "svc"}
    assert challenges[2].params == {}


def test_parse_challenge_escapes_and_case():
    (c,) = parse_challenges(r'BEARER Realm="a \"quoted\" realm",SCOPE="x"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": 'a "quoted" realm', "scope": "x"}
    assert parse_challenges("") == []


# -- the token cache --------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


KEY = ("https://auth.example/token", "registry.example", "repository:a/b:pull")


def test_token_cache_expires_early_by_the_clock():
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    cache.put(KEY, "tok", 300)
    assert cache.get(KEY) == "tok"
    clock.now += 300 - TokenCache.EARLY - 0.01
    assert cache.get(KEY) == "tok"
    clock.now += 0.01  # EARLY seconds before the registry's expiry: dropped
    assert cache.get(KEY) is None
    assert cache.get(KEY) is None  # and forgotten


def test_token_cache_default_and_short_lifetimes():
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    cache.put(KEY, "default", None)  # no expires_in: the spec's 60 s
    clock.now += 54.9
    assert cache.get(KEY) == "default"
    clock.now += 0.2
    assert cache.get(KEY) is None
    cache.put(KEY, "short", 4)  # shorter than the margin: half its life
    clock.now += 1.9
    assert cache.get(KEY) == "short"
    clock.now += 0.2
    assert cache.get(KEY) is None


def test_token_cache_is_per_scope_and_drop_forgets():
    cache = TokenCache(clock=FakeClock())
    other = (KEY[0], KEY[1], "repository:a/c:pull")
    cache.put(KEY, "t1", 60)
    assert cache.get(other) is None  # a token for one repository is not offered for another
    cache.put(other, "t2", 60)
    cache.drop(KEY)
    assert cache.get(KEY) is None
    assert cache.get(other) == "t2"


# -- credentials ----------------------------------------------------------------------------


def test_credentials_repr_hides_secrets():
    creds = Credentials("alice", "hunter2-secret", "idtok-secret")
    text = repr(creds) + str(creds)
    assert "alice" in text
    assert "hunter2-secret" not in text
    assert "idtok-secret" not in text
    assert creds.basic_header() == "Basic " + b64("alice:hunter2-secret")


def test_docker_config_parse_entries():
    doc = json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": b64("hubuser:hubpass")},
        "reg.example:5000": {"username": "u2", "password": "p2"},
        "http://tokens.example/v2/": {"username": "u3", "identitytoken": "refresh-me"},
        "empty.example": {},
        "Upper.Example": {"auth": b64("u4:pa:ss")},  # the password may contain ':'
    }})
    config = DockerConfig.parse(doc, "config.json")
    assert set(config.auths) == {"docker.io", "reg.example:5000", "tokens.example", "empty.example",
                                 "upper.example"}
    assert config.lookup("docker.io") == Credentials("hubuser", "hubpass")
    assert config.lookup("registry-1.docker.io") == Credentials("hubuser", "hubpass")
    assert config.lookup("index.docker.io") == Credentials("hubuser", "hubpass")
    assert config.lookup("reg.example:5000") == Credentials("u2", "p2")
    assert config.lookup("reg.example") is None  # exact host:port match
    assert config.lookup("tokens.example") == Credentials("u3", identity_token="refresh-me")
    assert config.lookup("empty.example") is None
    assert config.lookup("upper.example") == Credentials("u4", "pa:ss")


@pytest.mark.parametrize(("text", "problem"), [
    ("{not json", "is not valid JSON"),
    ("[]", "is not a JSON object"),
])
def test_docker_config_parse_errors_name_the_origin(text, problem):
    with pytest.raises(ValidationError) as info:
        DockerConfig.parse(text, "/home/me/.docker/config.json")
    assert info.value.message == f"/home/me/.docker/config.json {problem}"


def test_docker_config_bad_base64_auth():
    config = DockerConfig.parse(json.dumps({"auths": {"r": {"auth": "!!!not base64"}}}), "c")
    with pytest.raises(ValidationError, match="not base64"):
        config.lookup("r")


FAKE_HELPER = """\
    #!/bin/sh
    # docker-credential-fake: records its argument and stdin, answers for known servers
    server=$(cat)
    printf '%s %s\\n' "$1" "$server" >> "{log}"
    case "$server" in
      reg.example:5000) echo '{{"ServerURL": "reg.example:5000", "Username": "helperuser", "Secret": "helper-secret"}}' ;;
      https://index.docker.io/v1/) echo '{{"ServerURL": "https://index.docker.io/v1/", "Username": "hub", "Secret": "hub-secret"}}' ;;
      token.example) echo '{{"ServerURL": "token.example", "Username": "<token>", "Secret": "refresh-token"}}' ;;
      garbage.example) echo 'this is not json' ;;
      *) echo "credentials not found in native keychain"; exit 1 ;;
    esac
"""


@pytest.fixture
def fake_helper(tmp_path, monkeypatch):
    """Install ``docker-credential-fake`` on PATH; yields the file its calls are logged to."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "helper.log"
    script = bindir / "docker-credential-fake"
    script.write_text(textwrap.dedent(FAKE_HELPER).format(log=log))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return log


def helper_calls(log) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_cred_helper_gets_the_server_on_stdin(fake_helper):
    config = DockerConfig.parse(json.dumps({"credHelpers": {"reg.example:5000": "fake"},
                                            "auths": {"reg.example:5000": {"auth": b64("inline:ignored")}}}), "c")
    creds = config.lookup("reg.example:5000")
    assert creds == Credentials("helperuser", "helper-secret")  # the helper wins over inline auths
    assert helper_calls(fake_helper) == ["get reg.example:5000"]


def test_cred_helper_identity_token(fake_helper):
    config = DockerConfig(cred_helpers={"token.example": "fake"})
    assert config.lookup("token.example") == Credentials(identity_token="refresh-token")


def test_cred_helper_not_found_means_no_credentials(fake_helper):
    config = DockerConfig(cred_helpers={"nothing.example": "fake"})
    assert config.lookup("nothing.example") is None
    assert helper_calls(fake_helper) == ["get nothing.example"]


def test_cred_helper_answering_garbage(fake_helper):
    config = DockerConfig(cred_helpers={"garbage.example": "fake"})
    with pytest.raises(AuthError, match="not JSON"):
        config.lookup("garbage.example")


def test_creds_store_is_the_fallback(fake_helper):
    config = DockerConfig.parse(json.dumps({"credsStore": "fake",
                                            "auths": {"inline.example": {"auth": b64("i:p")}}}), "c")
    assert config.lookup("inline.example") == Credentials("i", "p")
    assert helper_calls(fake_helper) == []  # inline credentials did not need the store
    assert config.lookup("reg.example:5000") == Credentials("helperuser", "helper-secret")
    assert helper_calls(fake_helper) == ["get reg.example:5000"]


def test_docker_hub_is_asked_of_helpers_by_docker_s_server_url(fake_helper):
    # docker login stores Hub credentials in helpers under https://index.docker.io/v1/
    config = DockerConfig.parse(json.dumps({"credsStore": "fake"}), "c")
    assert config.lookup("registry-1.docker.io") == Credentials("hub", "hub-secret")
    assert helper_calls(fake_helper) == ["get https://index.docker.io/v1/"]


def test_missing_helper_is_an_auth_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    config = DockerConfig(cred_helpers={"r": "absent"})
    with pytest.raises(AuthError, match="docker-credential-absent is not installed"):
        config.lookup("r")


def test_keychain_order_and_docker_config(tmp_path, monkeypatch):
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    (docker_dir / "config.json").write_text(json.dumps({"auths": {
        "a.example": {"auth": b64("from-docker:x")}, "b.example": {"auth": b64("docker-b:y")}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_dir))
    assert docker_config_path() == docker_dir / "config.json"
    secret = DockerConfig(auths={"a.example": {"username": "from-secret", "password": "s"}})
    chain = Keychain([secret])
    assert chain.resolve("a.example").username == "from-secret"  # pull secrets first
    assert chain.resolve("b.example").username == "docker-b"
    assert chain.resolve("c.example") is None
    assert Keychain([secret], use_docker_config=False).resolve("b.example") is None


# -- pull secrets ---------------------------------------------------------------------------


def test_secret_store_create_is_private_and_loads(tmp_path):
    store = SecretStore(tmp_path / "secrets")
    path = store.create("team-a:registry", "https://Reg.Example:5000/v2/", "bob", "s3cret")
    assert path == tmp_path / "secrets" / "team-a" / "registry.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = store.load("team-a:registry")
    assert config.lookup("reg.example:5000") == Credentials("bob", "s3cret")
    assert store.list() == ["team-a:registry"]
    store.create("team-a:registry", "reg.example:5000", "bob", "rotated")  # replace
    assert store.load("team-a:registry").lookup("reg.example:5000").password == "rotated"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.delete("team-a:registry") is True
    assert store.delete("team-a:registry") is False
    assert store.list() == []


def test_secret_store_refuses_a_readable_secret(tmp_path):
    store = SecretStore(tmp_path)
    path = store.create("ns:name", "r.example", "u", "Pa55-word-xyz")
    path.chmod(0o644)
    with pytest.raises(ValidationError) as info:
        store.load("ns:name")
    assert "chmod 600" in info.value.message
    assert str(path) in info.value.message
    assert "644" in info.value.message
    assert "Pa55-word-xyz" not in info.value.message
    path.chmod(0o640)  # group-readable is refused too
    with pytest.raises(ValidationError, match="chmod 600"):
        store.load("ns:name")


def test_secret_store_refuses_a_symlink_and_a_missing_secret(tmp_path):
    store = SecretStore(tmp_path)
    with pytest.raises(ValidationError, match="does not exist"):
        store.load("ns:absent")
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    target.chmod(0o600)
    (tmp_path / "ns").mkdir()
    (tmp_path / "ns" / "link.json").symlink_to(target)
    with pytest.raises(ValidationError, match="not a regular file"):
        store.load("ns:link")


@pytest.mark.parametrize("bad", ["noseparator", "ns:", ":name", "NS:name", "ns:na_me", "ns:-name", "ns:name-",
                                 "ns:a/b", "../x:y", "ns:name\n", "ns:" + "a" * 254, "a" * 64 + ":name",
                                 "ns.x:name", "ns:a..b", "ns:.a", "ns:a.", "ns:a.-b", "a:b:c"])
def test_secret_store_invalid_names(tmp_path, bad):
    store = SecretStore(tmp_path)
    with pytest.raises(ValidationError) as info:
        store.create(bad, "r", "u", "p")
    assert "invalid pull secret" in info.value.message
    assert not any(tmp_path.iterdir())


def test_secret_store_valid_long_names(tmp_path):
    store = SecretStore(tmp_path)
    assert store.split_name("a:" + "b" * 63) == ("a", "b" * 63)


# -- containers-auth.json(5) ----------------------------------------------------------------


def test_a_namespace_entry_applies_to_the_repositories_under_it_most_specific_first():
    doc = json.dumps({"auths": {
        "quay.io": {"auth": b64("host-wide:h")},
        "quay.io/team": {"auth": b64("team:t")},
        "quay.io/team/app": {"auth": b64("app:a")},
        "host:5000/team/app": {"auth": b64("port-app:p")},
        "https://quay.io/v1/": {"auth": b64("legacy-url:l")},  # the plain host key wins over the URL form
    }})
    config = DockerConfig.parse(doc, "auth.json")
    assert config.lookup("quay.io", "team/app").username == "app"
    assert config.lookup("quay.io", "team/app/sub").username == "app"
    assert config.lookup("quay.io", "team/web").username == "team"
    assert config.lookup("quay.io", "teamwork/web").username == "host-wide"  # a path segment, not a prefix
    assert config.lookup("quay.io", "other").username == "host-wide"
    assert config.lookup("quay.io").username == "host-wide"
    assert config.lookup("host:5000", "team/app").username == "port-app"
    assert config.lookup("host:5000", "team/other") is None
    assert config.lookup("host", "team/app") is None  # the port is part of the registry


def test_an_empty_namespace_entry_falls_back_to_the_next_key():
    config = DockerConfig.parse(json.dumps({"auths": {"r.example/team": {}, "r.example": {"auth": b64("u:p")}}}),
                                "c")
    assert config.lookup("r.example", "team/app") == Credentials("u", "p")


def write_auth(path, auths):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {k: {"auth": b64(v)} for k, v in auths.items()}}))
    return path


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """An environment with each credentials file in its own place, and none of the machine's."""
    env = {"XDG_RUNTIME_DIR": tmp_path / "run", "XDG_CONFIG_HOME": tmp_path / "config",
           "DOCKER_CONFIG": tmp_path / "docker"}
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    return {"runtime": tmp_path / "run/containers/auth.json", "config": tmp_path / "config/containers/auth.json",
            "docker": tmp_path / "docker/config.json", "override": tmp_path / "elsewhere/auth.json"}


def test_files_are_read_in_the_order_containers_auth_json_gives(user_files, monkeypatch):
    write_auth(user_files["runtime"], {"a.example": "runtime:1"})
    write_auth(user_files["config"], {"a.example": "config:2", "b.example": "config:2"})
    write_auth(user_files["docker"], {"a.example": "docker:3", "b.example": "docker:3", "c.example": "docker:3"})
    chain = Keychain()
    assert [chain.resolve(h, "r").username for h in ("a.example", "b.example", "c.example")] == [
        "runtime", "config", "docker"]
    assert chain.resolve("d.example", "r") is None

    # REGISTRY_AUTH_FILE (what --authfile sets) takes the runtime file's place
    write_auth(user_files["override"], {"a.example": "override:0"})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(user_files["override"]))
    chain = Keychain()
    assert chain.resolve("a.example", "r").username == "override"
    assert chain.resolve("b.example", "r").username == "config"
    assert Keychain(use_docker_config=False).resolve("a.example", "r") is None


def test_a_file_earlier_in_the_order_wins_even_host_wide(user_files):
    write_auth(user_files["runtime"], {"q.example": "host-wide:1"})
    write_auth(user_files["config"], {"q.example/team": "team:2"})
    assert Keychain().resolve("q.example", "team/app").username == "host-wide"


def test_pull_secrets_come_before_the_user_files(user_files):
    write_auth(user_files["runtime"], {"a.example": "runtime:1"})
    secret = DockerConfig(auths={"a.example": {"username": "from-secret", "password": "s"}})
    assert Keychain([secret]).resolve("a.example", "r").username == "from-secret"


def test_a_malformed_auth_file_is_named_and_no_secret_is_shown(user_files):
    user_files["runtime"].parent.mkdir(parents=True)
    user_files["runtime"].write_text('{"auths": {"a.example": {"auth": "c2VjcmV0OnBhc3N3b3Jk"}, ')
    with pytest.raises(ValidationError) as info:
        Keychain().resolve("a.example", "r")
    assert str(user_files["runtime"]) in info.value.message
    assert "c2VjcmV0" not in info.value.message and "password" not in info.value.message


def test_a_pull_secret_keeps_its_namespace_entries():
    from builder.registry.auth import registry_auths

    auths = registry_auths({"quay.io/team": {"auth": b64("team:t")}, "https://quay.io/v1/": {"auth": b64("h:h")}}, "s")
    config = DockerConfig(auths=auths)
    assert config.lookup("quay.io", "team/app").username == "team"
    assert config.lookup("quay.io", "other/app").username == "h"
