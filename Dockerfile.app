# Sample fraud-scoring app image: scores each transaction that the input reader
# posts and forwards the result to the output writer. Build from the repository
# root, with a model trained beforehand:
#   python -m sample_app.train --out models/fraud-model.joblib
#   docker build -f Dockerfile.app -t agogosml-sample-app .
# The image is built from the model file, not from the dataset, so the build
# downloads no data. The final stage contains the base image, the virtual
# environment in /opt/venv and the model file. It runs as UID 10001 and writes
# nothing outside /tmp, so it also runs with a read-only root filesystem.

ARG BASE_IMAGE=python:3.12-slim-bookworm

FROM ${BASE_IMAGE} AS builder

WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that a change to the
# source reuses this layer. The virtual environment gets no pip of its own:
# the base image's pip installs into it, so the final image has no installer
# in /opt/venv.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\\n'.join(p['dependencies'] + p['optional-dependencies']['sample']))" > requirements.txt \
    && python -m venv --without-pip /opt/venv \
    && python -m pip --python /opt/venv/bin/python install --no-cache-dir \
        --disable-pip-version-check -r requirements.txt

COPY setup.py README.md ./
COPY agogosml ./agogosml
COPY agogosml_cli ./agogosml_cli
COPY sample_app ./sample_app
RUN python -m pip --python /opt/venv/bin/python install --no-cache-dir \
    --disable-pip-version-check --no-deps ".[sample]"

# A path inside the build context. .dockerignore admits only models/*.joblib.
ARG MODEL_FILE=models/fraud-model.joblib
COPY ${MODEL_FILE} /opt/agogosml/models/fraud-model.joblib

# Load the model with the packages installed above. A model saved by another
# scikit-learn or numpy version then fails the build, not the app's start.
RUN chmod 0644 /opt/agogosml/models/fraud-model.joblib \
    && /opt/venv/bin/python -c "import sys, warnings; from sklearn.exceptions import InconsistentVersionWarning; from sample_app.scoring import FraudModel; warnings.simplefilter('error', InconsistentVersionWarning); print('model version', FraudModel.load(sys.argv[1]).version)" \
        /opt/agogosml/models/fraud-model.joblib

FROM ${BASE_IMAGE}

# The home directory is /tmp because that is the only writable path when the
# root filesystem is mounted read-only.
RUN groupadd --system --gid 10001 agogosml \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp \
        --no-create-home --shell /usr/sbin/nologin agogosml

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/agogosml/models /opt/agogosml/models

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    APP_HOST=0.0.0.0 \
    APP_PORT=8000 \
    SAMPLE_APP_MODEL_PATH=/opt/agogosml/models/fraud-model.joblib

WORKDIR /tmp
USER 10001:10001
EXPOSE 8000

# The labels come last, so that a new REVISION or VERSION does not invalidate
# the cached layers above.
ARG BASE_IMAGE
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="agogosml sample fraud-scoring app" \
      org.opencontainers.image.description="Scores card transactions with a scikit-learn fraud model and forwards each score to the output writer" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# Slim images have no curl, so Python's urllib performs the check. The empty
# ProxyHandler keeps HTTP_PROXY settings from routing the loopback request.
# Importing scikit-learn and loading the model take a few seconds on start.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request as r; r.build_opener(r.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ['APP_PORT'], timeout=4)"]

ENTRYPOINT ["/opt/venv/bin/agogosml-sample-app"]
