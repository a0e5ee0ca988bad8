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

step "imc cache create: a flash cache of three images, usable before its volume is packed"
$IMC cache create demo --flash --wait --plain-http "$REG" \
    --image "$REG/fixtures/app:1.0" --image "$REG/fixtures/oci-app:1.0" --image "$REG/fixtures/multi:1.0"
$IMC cache list
$IMC volume inspect demo

step "imc match: which cache a pod asking for fixtures/app:1.0 would use"
$IMC match --image "$REG/fixtures/app:1.0" --storage 10

step "imc serve: the cache as a read-only registry; skopeo pulls from it with the upstream stopped"
$PY registry-fixtures/regfix.py down --state "$STATE" >/dev/null
$IMC serve --listen 127.0.0.1:0 2>"$RUN/serve.log" &
SERVE_PID=$!
for _ in $(seq 50); do grep -q "serving on" "$RUN/serve.log" && break; sleep 0.1; done
SERVE=$(sed -n 's|.*serving on http://\([^ ]*\).*|\1|p' "$RUN/serve.log")
skopeo copy -q --src-tls-verify=false "docker://$SERVE/fixtures/app:1.0" "dir:$RUN/copied"
echo "manifest copied from imc serve: sha256:$(sha256sum < "$RUN/copied/manifest.json" | cut -d' ' -f1)"
echo "manifest digest in the cache:   $($IMC cache get demo -o json | $PY -c 'import json,sys; print(json.load(sys.stdin)["status"]["images"][0]["digest"])')"
kill $SERVE_PID; wait $SERVE_PID 2>/dev/null || true

step "done: everything was under $RUN (removed on exit)"
