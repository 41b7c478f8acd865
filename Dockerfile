# vLLM's official OpenAI-compatible server image with the streamer load format installed.
#   docker build -t vllm-streamer .
#   docker run --gpus all -p 8000:8000 -v /models:/models vllm-streamer \
#       /models/Llama-3.1-8B-Instruct --load-format streamer
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

LABEL org.opencontainers.image.title="vllm-streamer" \
      org.opencontainers.image.description="vLLM with the loader-plugins streamer (--load-format streamer)"

WORKDIR /opt/loader-plugins
COPY pyproject.toml README.md ./
COPY loader_plugins ./loader_plugins
COPY native ./native

# --no-deps keeps the image's own torch and vLLM; boto3 and tqdm are the only extra needs.
RUN python3 -m pip install --no-cache-dir --no-deps /opt/loader-plugins \
    && python3 -m pip install --no-cache-dir "boto3==1.40.0" "tqdm==4.67.1" \
    && python3 -c "import loader_plugins.vllm_adapter as a; a.register()"

WORKDIR /
# The base image's entrypoint is `vllm serve`; arguments after the image name go to it.
