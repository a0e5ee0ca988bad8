#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo need, only where missing:
# docker-registry (registry:2), skopeo (the peer we verify and benchmark against),
# podman (podman load takes the exported archives whole), containerd (ctr pulls through
# imc serve with a generated hosts.toml). kubectl comes from
# install-kubectl.sh (Debian's kubernetes-client is too old for imc serve).
# apt-get waits for a lock another install holds instead of failing.
# A registry binary named registry (upstream distribution, Fedora's docker-distribution)
# or given by IMC_REGISTRY_BIN counts as installed.
set -euo pipefail
missing=()
[ -n "${IMC_REGISTRY_BIN:-}" ] || command -v docker-registry >/dev/null 2>&1 || command -v registry >/dev/null 2>&1 \
    || missing+=(docker-registry)
command -v skopeo >/dev/null 2>&1 || missing+=(skopeo)
command -v podman >/dev/null 2>&1 || missing+=(podman)
{ command -v containerd >/dev/null 2>&1 && command -v ctr >/dev/null 2>&1; } || missing+=(containerd)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt=(apt-get -o DPkg::Lock::Timeout=300)
$sudo "${apt[@]}" update -qq
$sudo "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
