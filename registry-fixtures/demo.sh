#!/usr/bin/env bash
# `make demo`: the main job end to end against a registry:2 this script starts and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
IMC=.venv/bin/imc
RUN=$(mktemp -d -t imc-demo-XXXXXX)
STATE=$RUN/registries.json
export IMC_HOME=$RUN/home

cleanup() { $PY registry-fixtures/regfix.py down --state "$STATE" >/dev/null 2>&1 || true; rm -rf "$RUN"; }
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Starting registry:2 on loopback and pushing the sample images"
$PY registry-fixtures/regfix.py up --state "$STATE" --workdir "$RUN/registries"
REG=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["endpoints"]["plain"]["host"])' "$STATE")

step "imc pull: two images into an empty store (plain HTTP only because we list $REG)"
$IMC pull --plain-http "$REG" "$REG/fixtures/app:1.0" "$REG/fixtures/oci-app:1.0"

step "imc pull: a second version sharing its base layers fetches only what is new"
$IMC pull --plain-http "$REG" "$REG/fixtures/app:2.0"

step "imc layers list: each layer stored once, with the images that use it"
$IMC layers list

step "imc layers verify: every blob rehashed against its digest"
$IMC layers verify

step "done: store at $IMC_HOME (removed on exit)"
