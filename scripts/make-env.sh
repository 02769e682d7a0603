#!/usr/bin/env bash
# Write a .env for docker-compose.yaml: .env.example with every empty secret filled with a fresh random value.
# Usage: bash scripts/make-env.sh [OUTPUT]   (default: .env next to docker-compose.yaml; never overwritten)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$here/.env}"
if [ -e "$out" ]; then
  echo "$out exists; not overwriting it" >&2
  exit 1
fi
umask 077
python3 - "$here/.env.example" "$out" <<'PY'
import base64, os, re, secrets, sys

def fernet_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()

generators = {"AIRFLOW_FERNET_KEY": fernet_key}
lines = []
for line in open(sys.argv[1], encoding="utf-8"):
    match = re.fullmatch(r"([A-Z0-9_]+)=\n?", line)
    if match:  # an empty variable is a secret to generate (letters and digits: safe inside URLs)
        name = match.group(1)
        line = f"{name}={generators.get(name, lambda: secrets.token_hex(24))()}\n"
    lines.append(line)
with open(sys.argv[2], "w", encoding="utf-8") as out:
    out.writelines(lines)
PY
echo "wrote $out (mode 0600)"
