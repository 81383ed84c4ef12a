# Hosted vitlens: the Streamlit app and the capture worker(s) in one container on a CUDA
# PyTorch base image. See docs/hosting.md.
#
#   docker build -t vitlens .
#   docker build -t vitlens --build-arg PREFETCH="dinov2_vitl14 dinov2_vitl14_reg4" .   # bake hub weights in
#   docker run --gpus all -p 8501:8501 -v vitlens-data:/data vitlens
#
# The base image's CUDA build of torch/torchvision is kept (pip is constrained to it); pick a
# tag whose torch is close to the one pinned in requirements.txt.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/opt/hf \
    VITLENS_MODE=hosted \
    VITLENS_CACHE_DIR=/data/cache \
    VITLENS_WEIGHTS_DIR=/data/weights

WORKDIR /opt/vitlens
COPY requirements.txt ./
RUN python -m pip freeze | grep -iE '^(torch|torchvision)==' > /tmp/base-torch.txt \
 && grep -vE '^(torch|torchvision)==' requirements.txt > /tmp/requirements.txt \
 && python -m pip install -c /tmp/base-torch.txt -r /tmp/requirements.txt \
 && python -c "import torch, timm, diskcache, streamlit; print('torch', torch.__version__, 'timm', timm.__version__)"

COPY pyproject.toml README.md ./
COPY vitlens ./vitlens
RUN python -m pip install --no-deps --no-build-isolation -e .

# Hub weights baked into the image (needs internet while building); HF_HOME=/opt/hf.
ARG PREFETCH=""
RUN for name in $PREFETCH; do python -m vitlens fetch "$name" || exit 1; done

COPY app ./app
COPY .streamlit ./.streamlit
COPY bench ./bench
COPY docker/entrypoint.sh /usr/local/bin/vitlens-entrypoint
RUN mkdir -p /data/cache /data/weights

EXPOSE 8501
VOLUME ["/data"]
ENTRYPOINT ["vitlens-entrypoint"]
