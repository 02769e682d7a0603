#!/usr/bin/env bash
# Debian packages the tests and benchmarks need: a real PACS (Orthanc), DCMTK, PostgreSQL, Redis, and
# docker-compose (its `config` validates docker-compose.yaml without a container engine), Chromium with its
# WebDriver for the browser tests of the audit pages, and dicom3tools (dciodvfy checks that released files are
# as valid as their sources).
# Idempotent: does nothing when every tool is already there.
set -euo pipefail

missing=()
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
command -v findscu >/dev/null 2>&1 || missing+=(dcmtk)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packages start their own services; pacsflow runs private instances on free ports instead.
for service in orthanc postgresql redis-server; do
  $sudo service "$service" stop >/dev/null 2>&1 || true
done
