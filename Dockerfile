# The Baton image: the operator (`baton operator`, what charts/baton runs) and the request scheduler
# (`baton scheduler`, the image of every model's scheduler Deployment unless spec.scheduler.image
# says otherwise). Build from the repository root:
#
#   docker build -t ghcr.io/baton-serving/baton:0.1.0 .
#
# tests/unit/test_chart.py checks this file statically (no image is built in the tests).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build needs: pyproject.toml names README.md as its readme, and the
# package lives in operator/.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ ./operator/
# The extras a model's scheduler may need: redis (spec.scheduler.degradation.store: redis) and tokenizer
# (spec.scheduler.tokenizer: model).
RUN pip install ".[redis,tokenizer]" \
    && rm -rf /src

# A fixed numeric UID, so Kubernetes can verify runAsNonRoot (charts/baton runs it as 10001).
RUN groupadd --system --gid 10001 baton \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin baton
WORKDIR /
USER 10001:10001

# 8080: Prometheus metrics (--metrics-address); 8081: kopf's liveness endpoint (--liveness).
EXPOSE 8080 8081
ENTRYPOINT ["baton"]
CMD ["operator", "--all-namespaces"]
