# One image that runs the pipeline and serves the registry's champion model.
#
#   docker build -t siamese-recognizer .
#
# Serve the champion of a checkout's registry on port 8080 (mount the checkout at the
# same path, so the artifact paths MLflow recorded resolve inside the container):
#   docker run --rm -p 8080:8080 -v "$PWD":"$PWD" -w "$PWD" \
#       -e MLFLOW_TRACKING_URI="sqlite:///$PWD/mlflow.db" siamese-recognizer
#   curl -s localhost:8080/invocations -H 'Content-Type: application/json' \
#       -d "{\"dataframe_records\": [{\"image\": \"$(base64 -w0 some.png)\"}]}"
#
# Run the pipeline on that checkout (the results stay in it):
#   docker run --rm -v "$PWD":"$PWD" -w "$PWD" -e MLFLOW_TRACKING_URI="sqlite:///$PWD/mlflow.db" \
#       siamese-recognizer dvc repro
# or on the image's own copy of the project (the results stay in the container):
#   docker run --rm siamese-recognizer dvc repro
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory '*'

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    DVC_NO_ANALYTICS=1 \
    MLFLOW_TRACKING_URI=sqlite:////app/mlflow.db \
    MODEL_NAME=siamese-recognizer

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY siamese_core siamese_core
COPY pipelines pipelines
RUN pip install -c constraints.txt .

# The project files `dvc repro` needs; the copy has no git history, so DVC runs without git here.
COPY params.yaml dvc.yaml prefect.yaml .dvcignore ./
COPY .dvc .dvc
COPY data/demo.dvc data/demo.dvc
RUN dvc config --local core.no_scm true && siamese demo-data

EXPOSE 8080
CMD ["sh", "-c", "exec siamese serve --model \"models:/${MODEL_NAME}@champion\" --host 0.0.0.0 --port 8080"]
