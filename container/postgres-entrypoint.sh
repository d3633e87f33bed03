#!/bin/sh
# First start: a cluster whose superuser is siamese_admin, and one login role and database per service
# (mlflow, prefect), each owning its database and nothing else, as `siamese stack up` makes them.
# Passwords from the environment (container/.env); password logins over the network, trust on the socket.
set -eu
bin=/usr/lib/postgresql/15/bin
data=/var/lib/postgresql/data/pgdata
if [ ! -s "$data/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_ADMIN_PASSWORD" > "$pwfile"
    "$bin/initdb" -D "$data" -U siamese_admin --pwfile="$pwfile" --auth-host=scram-sha-256 --auth-local=trust \
        -E UTF8 --locale=C >/dev/null
    rm -f "$pwfile"
    printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >> "$data/pg_hba.conf"
    "$bin/pg_ctl" -D "$data" -o "-c listen_addresses='' -c unix_socket_directories=/tmp" -w start >/dev/null
    "$bin/psql" -h /tmp -U siamese_admin -d postgres -v ON_ERROR_STOP=1 -q \
        -v mlflow="$MLFLOW_DB_PASSWORD" -v prefect="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'mlflow';
CREATE ROLE prefect LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'prefect';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
REVOKE ALL ON DATABASE postgres FROM PUBLIC;
SQL
    "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null
fi
exec "$bin/postgres" -D "$data" -c listen_addresses='*' -c unix_socket_directories=/tmp
