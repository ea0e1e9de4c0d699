# llm-mesh image: every service (python -m services.<name>) and the converted model.
#   CPU:  docker build -t llm-mesh:0.1.0 .
#   CUDA: docker build --build-arg VARIANT=cuda -t llm-mesh:0.1.0-cuda .
ARG VARIANT=cpu
ARG PYTHON=3.11

FROM python:${PYTHON}-slim AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3.11 /usr/local/bin/python
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM base-${VARIANT}
WORKDIR /app
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN python -m venv /opt/venv && pip install --no-cache-dir --index-url ${TORCH_INDEX} "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY llmmesh ./llmmesh
COPY services ./services
# convert: the GGUF -> safetensors step of `make model`, done once at build time.
RUN pip install --no-cache-dir ".[kubernetes,parallel,convert]"
RUN python -m services.model_shard.model.fetch --out models/SmolLM2-135M-Instruct \
    && pip uninstall -y transformers gguf accelerate && rm -rf /root/.cache
# The native kernels, built for any x86-64 with AVX2 (the image runs on other machines); their AVX-512 paths,
# the int8/int4 kernels among them, are compiled in too and chosen at run time where the CPU has AVX-512.
# The compiler leaves the image again, shards load the library from TORCH_EXTENSIONS_DIR.
ENV TORCH_EXTENSIONS_DIR=/opt/llmmesh-kernels
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && LLMMESH_NATIVE_MARCH=x86-64-v3 python -m services.model_shard.model.native \
    && apt-get purge -y g++ && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
USER 10001
EXPOSE 50051 50052 50053 50061 8000 9400
CMD ["python", "-m", "services.launcher", "--help"]
