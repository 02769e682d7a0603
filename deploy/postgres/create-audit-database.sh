#!/bin/bash
# Run once by the postgres image on its first start: pacsflow's audit store in a database of its own,
# owned by a role of its own (the audit holds patient identifiers; Airflow's role cannot read it).
set -euo pipefail
: "${PACSFLOW_AUDIT_PASSWORD:?set PACSFLOW_AUDIT_PASSWORD}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v password="$PACSFLOW_AUDIT_PASSWORD" <<'SQL'
CREATE ROLE pacsflow LOGIN PASSWORD :'password';
CREATE DATABASE pacsflow_audit OWNER pacsflow;
REVOKE ALL ON DATABASE pacsflow_audit FROM PUBLIC;
SQL
