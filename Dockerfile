# One image for the pipeline, the server and every Python service of the team stack (container/compose.yaml).
#
# With a registry (the public Python image as base):
#   docker build -t siamese-recognizer .
# Offline, on the base image made from Debian's packages by container/base-image.sh:
#   podman build --format docker --build-arg BASE_IMAGE=localhost/siamese-base:bookworm -t siamese-recognizer .
# (--format docker keeps the HEALTHCHECK: podman's default OCI format drops it.) Behind a TLS-intercepting proxy,
# hand pip the proxy's CA bundle as a build secret; it is used for the build only, never stored in the image:
#   podman build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt ...
#
# Serve the registry's champion (the model comes from the tracking server, never from the image):
#   docker run --rm -p 8080:8080 -e MLFLOW_TRACKING_URI=http://mlflow.example:5000 siamese-recognizer
# or a model folder mounted read-only:
#   docker run --rm -p 8080:8080 -v "$PWD/model":/model:ro -e SIAMESE_MODEL=/model siamese-recognizer
# Run the demo pipeline on the image's own copy of the project (a git repository of one commit; results stay in
# the container unless /app is a volume):
#   docker run --rm siamese-recognizer sh -c 'siamese demo-data && dvc repro'
# or on a checkout, mounted at the same path so the artifact paths MLflow records resolve on the host too:
#   docker run --rm -u "$(id -u)" -v "$PWD":"$PWD" -w "$PWD" siamese-recognizer dvc repro
# Docs: docs/how-to/containers.md.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Set first, so that no step below leaves stray bytecode in the image: it is compiled once, on purpose, below.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    SIAMESE_MODEL=models:/siamese-recognizer@champion

# git: DVC and each run's lineage (the commit it ran from). Docs, man pages and apt's lists are left out.
# /var/lib/siamese: where the stack's services keep their data (a volume in container/compose.yaml).
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log /usr/share/doc/* /usr/share/man/* \
    && git config --system --add safe.directory '*' \
    && useradd --create-home --uid 10001 --user-group siamese \
    && install -d -o siamese -g siamese /var/lib/siamese \
    && python3 -m venv /opt/venv

# The dependencies first, in a layer of their own that a code change does not rebuild: the package's and the
# [stack] extra's (boto3 fetches a model's artifacts from S3; the rest runs the stack's services), pinned by
# constraints.txt; no dev, docs or test tools. Trimmed of what only builds or tests them: TensorFlow's C++ headers,
# libclang (TensorFlow's op generator), pyarrow's headers and the test suites of numpy, pandas, scipy, scikit-learn,
# matplotlib and pyarrow. Then the bytecode of what is left and of the standard library, compiled once here: it
# halves every process's start (TensorFlow, MLflow and the CLI import in 5 s instead of 12 s). A module written
# for a later Python (such as *_312.py) does not compile, and is never imported: compileall's status is ignored.
COPY pyproject.toml constraints.txt /tmp/deps/
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -c "import tomllib; p = tomllib.load(open('/tmp/deps/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['stack']))" > /tmp/deps/requirements.txt \
    && pip install --no-compile -c /tmp/deps/constraints.txt -r /tmp/deps/requirements.txt \
    && pip uninstall -y -q libclang \
    && cd /opt/venv/lib/python3.11/site-packages \
    && rm -rf tensorflow/include pyarrow/include \
    && find numpy pandas scipy sklearn matplotlib pyarrow -type d -name tests -prune -exec rm -rf {} + \
    && rm -rf /tmp/deps /root/.cache \
    && { python3 -m compileall -qq -j 0 . "$(python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" \
         || true; }

# The project: installed, and kept in /app as the project `dvc repro` runs in (its stages' code deps are these
# files), a git repository of one commit owned by the unprivileged user the container runs as.
WORKDIR /app
COPY --chown=siamese:siamese . /app
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip install --no-deps /app \
    && rm -rf /app/build /app/*.egg-info
USER siamese
RUN git init -q \
    && git add -A \
    && git -c user.name=siamese -c user.email=siamese@localhost commit -qm "the image's project files"

EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/ping', timeout=4)"]
CMD ["sh", "-c", "exec siamese serve --model \"$SIAMESE_MODEL\" --host 0.0.0.0 --port 8080"]
