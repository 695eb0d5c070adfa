#!/usr/bin/env bash
# Wheels that `fox train` needs on the lent GPU machines (python 3.12, no registry there): DeepSpeed (built
# here from its pure-Python sdist), MLflow and jsonschema, and flash-linear-attention (pure Python: the recurrent
# baselines' kernels; the image has its transformers and einops), less what that machine's image already has.
# Run inside the project environment (building DeepSpeed imports torch).
# Usage: bash bench/device_wheels.sh [DIR=.whl-train]; then carry DIR and start the device command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src:$PWD/kernels
set -euo pipefail
out=${1:-.whl-train}
work=$(mktemp -d)
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64)
python3 -m pip download -q "${platform[@]}" -d "$work" mlflow==3.17.2 jsonschema hjson
python3 -m pip download -q --no-deps --no-binary=:all: -d "$work" deepspeed==0.19.8
python3 -m pip download -q --no-deps -d "$work" flash-linear-attention==0.6.0 fla-core==0.6.0
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$work" "$work"/deepspeed-0.19.8.tar.gz
mkdir -p "$out"
# the device image lacks these (its package list: /work/.library/device/KINDS.md)
for name in alembic annotated_types blinker cachetools cffi cryptography databricks_sdk docker fastapi flask-3 \
            flask_cors gitdb gitpython google_auth graphene graphql_core graphql_relay gunicorn hjson huey \
            importlib_metadata itsdangerous mako mlflow-3 mlflow_skinny mlflow_tracing opentelemetry prettytable \
            pyasn1 pycparser pydantic python_dotenv skops smmap sqlalchemy sqlparse starlette typing_inspection \
            uvicorn wcwidth jsonschema referencing rpds_py deepspeed-0.19.8-py3 flash_linear_attention fla_core; do
    cp "$work"/"$name"*.whl "$out"/
done
du -sh "$out"
