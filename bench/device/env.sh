# Sourced first in every device call (`source bench/device/env.sh`): the carried wheels, unbuffered output, the card.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .cache/whl/*.whl >/dev/null 2>&1 || echo "wheel install failed (carry .cache/whl; see bench/device/wheels.sh)"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, gguf; print('jax', jax.__version__, jax.devices())"
set -o pipefail
