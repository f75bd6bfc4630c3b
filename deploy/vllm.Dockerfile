# The GPU teacher: vLLM's OpenAI server, built the way `octomed-data vllm setup --gpu` builds its
# venv (pip's CUDA wheels of vllm 0.33.0 and the torch it pins), on the same digest-pinned base as
# the factory image, so every image of the stack is pinned by digest. The host needs the NVIDIA
# driver and container toolkit (compose reserves the GPU). Not built in this project's CI (no
# Docker, no GPU there); tests/deploy checks the rendered compose file and this file's pins.
FROM python:3.11-slim@sha256:90744cff8f32887f075c47d747a173ff333e9e98801667af93c357fa9f5e28ff
RUN pip install --no-cache-dir vllm==0.33.0
ENV VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# The runtime user (uid 10003, as compose's `user:`); HOME holds the HF / torch / triton caches.
RUN useradd --uid 10003 --user-group --create-home --shell /usr/sbin/nologin vllm
USER 10003:10003
ENTRYPOINT ["vllm"]
CMD ["--help"]
