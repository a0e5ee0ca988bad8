#!/usr/bin/env bash
# Installs what `make bench` alone needs, only where missing: a Java runtime, whose
# files (with the jars the machine has) make part of the real-file benchmark image
# (imagegen.py build_real_files). Not needed once that image is cached. A failed
# install is not fatal: the image is then made of what the machine has, and its
# description in the benchmark names the trees it was built from.
set -uo pipefail
cache="${1:-.fixtures-cache}"
ls "$cache"/realfiles-v*.json >/dev/null 2>&1 && exit 0
ls /usr/lib/jvm/*/bin/java >/dev/null 2>&1 && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing default-jre-headless with apt-get (for the real-file benchmark image)"
export DEBIAN_FRONTEND=noninteractive
apt=(apt-get -o DPkg::Lock::Timeout=300)
if ! { $sudo "${apt[@]}" update -qq && $sudo "${apt[@]}" install -y -qq --no-install-recommends default-jre-headless >/dev/null; }; then
    echo "could not install a Java runtime: the real-file image goes without one"
fi
exit 0
