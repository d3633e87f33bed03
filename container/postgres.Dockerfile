# PostgreSQL 15 from Debian's packages, for the team stack (container/compose.yaml); no registry needed offline:
#   podman build --build-arg BASE_IMAGE=localhost/siamese-base:bookworm -f container/postgres.Dockerfile \
#       -t localhost/siamese-postgres:15 container
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN mkdir -p /etc/postgresql-common \
    && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log /usr/share/doc/* /usr/share/man/* \
    && mkdir -p /var/lib/postgresql/data && chown postgres:postgres /var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
USER postgres
VOLUME /var/lib/postgresql/data
EXPOSE 5432
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/lib/postgresql/15/bin/pg_isready", "-h", "/tmp", "-q"]
CMD ["/usr/local/bin/postgres-entrypoint.sh"]
