# The operator image: the pure core + kopf + kubernetes client. No torch.
# Thin on purpose: the same `pip install` runs in CI (scripts/setup.sh installs .[dev]).
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY copd_runtime ./copd_runtime
COPY operator ./operator
RUN pip install ".[operator]" \
 && useradd --uid 65532 --create-home --shell /usr/sbin/nologin copd
USER 65532:65532
ENTRYPOINT ["copd-operator"]
# The Helm chart passes its own args (same ports by default: metrics 9090, /healthz+/readyz 8081).
EXPOSE 9090 8081
CMD ["--all-namespaces", "--metrics-port", "9090", "--health-port", "8081"]
