"""Reading an imc snapshot's manifest: reverse-domain annotation keys, and the keys
artifacts pushed by earlier versions carry."""

from __future__ import annotations

import json

import pytest

from builder.artifact import ARTIFACT_TYPE, CONFIG_TYPE, VOLUME_TYPE, parse_artifact
from builder.digest import Digest
from builder.errors import UnsupportedError
from builder.oci import OCI_MANIFEST


def manifest(prefix: str, offsets: list[str], size: str) -> bytes:
    config = b"{}"
    layers = [{"mediaType": VOLUME_TYPE, "digest": str(Digest.of(bytes([i]))), "size": 10,
               "annotations": {f"{prefix}.volume.offset": offset}} for i, offset in enumerate(offsets)]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
                       "config": {"mediaType": CONFIG_TYPE, "digest": str(Digest.of(config)), "size": len(config)},
                       "layers": layers, "annotations": {f"{prefix}.volume.size": size}}).encode()


@pytest.mark.parametrize("prefix", ["dev.imc", "vnd.imc"])
def test_offsets_and_size_are_read_from_either_key(prefix: str) -> None:
    artifact = parse_artifact(manifest(prefix, ["0", "10"], "20"), OCI_MANIFEST, "r/a:v1")
    assert [offset for _, offset in artifact.parts] == [0, 10] and artifact.volume_size == 20
    with pytest.raises(UnsupportedError, match="starts at 11, not 10"):
        parse_artifact(manifest(prefix, ["0", "11"], "20"), OCI_MANIFEST, "r/a:v1")
    with pytest.raises(UnsupportedError, match="the manifest says 21"):
        parse_artifact(manifest(prefix, ["0", "10"], "21"), OCI_MANIFEST, "r/a:v1")
