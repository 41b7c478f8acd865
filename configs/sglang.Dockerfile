# SGLang's official image with the streamer load format installed.
#   docker build -f configs/sglang.Dockerfile -t sglang-streamer .
#   docker run --gpus all --ipc=host -p 30000:30000 -v /models:/models sglang-streamer \
#       python3 -m sglang.launch_server --model-path /models/Qwen3-8B --load-format streamer \
#       --host 0.0.0.0 --port 30000 --model-loader-extra-config "$(cat configs/sglang-local.json)"
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23
FROM ${SGLANG_IMAGE}

LABEL org.opencontainers.image.title="sglang-streamer" \
      org.opencontainers.image.description="SGLang with the loader-plugins streamer (--load-format streamer)"

WORKDIR /opt/loader-plugins
COPY pyproject.toml README.md ./
COPY loader_plugins ./loader_plugins
COPY native ./native

# --no-deps keeps the image's own torch and SGLang; boto3 and tqdm are the only extra needs. The
# entry point (sglang.srt.plugins) is what SGLang finds in every process it starts.
RUN python3 -m pip install --no-cache-dir --no-deps /opt/loader-plugins \
    && python3 -m pip install --no-cache-dir "boto3==1.40.0" "tqdm==4.67.1" \
    && python3 -c "from importlib.metadata import entry_points as e; assert any(x.name == 'streamer' for x in e(group='sglang.srt.plugins'))"

WORKDIR /
