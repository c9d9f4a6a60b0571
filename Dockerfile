# The streamrec image: worker, lookup API and monitor (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU-only torch first, so `pip install .` does not pull the CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stream_app ./stream_app
COPY models ./models
COPY producers ./producers
RUN pip install . && rm -rf /src

RUN useradd --create-home --uid 10001 streamrec
USER streamrec
WORKDIR /home/streamrec

EXPOSE 8000 8050
CMD ["streamrec", "--help"]
