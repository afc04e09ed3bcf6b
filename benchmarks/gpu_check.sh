#!/bin/bash
python3 -m pip install -q --no-index --no-deps --target /tmp/pc .device-site/whl/*.whl
export PYTHONPATH=/tmp/pc:$PWD/.device-site/site:$PWD DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
# The GPU check in one command, at most 8 minutes on one GPU (benchmarks/gpu_check.py says what
# it runs and what passes): training from shards, kill -9 and resume, sampling, throughput.
# The two lines above make the GPU image's Python find DeepSpeed and the other pure-Python
# dependencies it lacks (../shared/tools/device-site.sh packs them).
#
# With the device tool, from the checkout the session started in (the one the tool sends):
#   1. here, once, with .venv active:   bash ../shared/tools/device-site.sh   (writes .device-site/)
#   2. run(command="bash benchmarks/gpu_check.sh", carry=[".device-site"], timeout_s=600)
# The table is at the end of output_tail; $OUT/gpu_check.json (rewritten after each part),
# $OUT/throughput.json and $OUT/samples.png come back. Extra arguments go to gpu_check.py.
exec python3 benchmarks/gpu_check.py --device cuda --out "${OUT:-runs/gpu_check}" "$@"
