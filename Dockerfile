# Two images from one file: `api` (Flask under gunicorn, no torch) and `worker` (adds torch + transformers).
FROM python:3.11-slim AS api
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 VISIONQ_API_HOST=0.0.0.0
COPY pyproject.toml README.md ./
COPY api ./api
COPY shared ./shared
COPY worker ./worker
COPY cli ./cli
RUN pip install .
EXPOSE 8000
CMD ["visionq", "api"]

# PyPI's torch wheels carry the CUDA runtime; the host's NVIDIA driver comes in through the container toolkit.
FROM api AS worker
ENV HF_HOME=/cache/huggingface
RUN pip install ".[worker]"
CMD ["visionq", "worker"]
