# The operator image: the pure core + kopf + kubernetes client, from uv.lock. No torch, and no
# runtime code: only copd_core/ and operator/ are copied, so only those packages are installed.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=0 UV_LINK_MODE=copy
WORKDIR /app
RUN pip install --root-user-action=ignore uv==0.13.9
COPY pyproject.toml uv.lock README.md ./
COPY copd_core ./copd_core
COPY operator ./operator
RUN uv sync --frozen --no-editable --extra operator --python /usr/local/bin/python3.11 \
 && rm -rf /root/.cache \
 && useradd --uid 65532 --create-home --shell /usr/sbin/nologin copd
ENV PATH=/app/.venv/bin:$PATH
USER 65532:65532
ENTRYPOINT ["copd-operator"]
# The Helm chart passes its own args (same ports by default: metrics 9090, /healthz+/readyz 8081).
EXPOSE 9090 8081
CMD ["--all-namespaces", "--metrics-port", "9090", "--health-port", "8081"]
