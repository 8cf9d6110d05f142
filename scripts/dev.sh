#!/usr/bin/env bash
# Set up a local environment (.venv) and run Hyprstream's main job or its tests.
#   scripts/dev.sh simulate [ARGS...]   set up, then `hyprstream simulate ARGS` (default experiment: quickstart)
#   scripts/dev.sh test [PYTEST ARGS]   set up, then run the test suite
#   scripts/dev.sh setup                set up only
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${HYPRSTREAM_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
PYTHON="${PYTHON:-python3}"

setup() {
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "Hyprstream needs Python >= 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
        exit 1
    fi
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    local stamp="$VENV/.hyprstream-setup"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "scripts/dev.sh" -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        # The CPU build of torch 2.13.0 first, so that nothing pulls a multi-GB CUDA build.
        "$VENV/bin/python" -m pip install -q torch==2.13.0
        "$VENV/bin/python" -m pip install -q -e ".[dev,onnx,dp,mqtt,text]"
        touch "$stamp"
    fi
    # System packages: mosquitto (the MQTT tests start their own broker on loopback), Chromium (the
    # dashboard tests load the page in it, headless) and the
    # Fashion-MNIST files (Debian's dataset-fashion-mnist).
    if [ -e /usr/sbin/mosquitto ]; then export PATH="$PATH:/usr/sbin"; fi
    local missing=()
    command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto mosquitto-clients)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # the dashboard tests load the page in it
    [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
            if [ -e /usr/sbin/mosquitto ]; then export PATH="$PATH:/usr/sbin"; fi
        else
            echo "missing system packages (apt-get install ${missing[*]}): some tests will fail" >&2
        fi
    fi
}

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1
export PATH="$VENV/bin:$PATH"

cmd="${1:-}"
shift || true
case "$cmd" in
    setup) setup ;;
    simulate) setup; exec "$VENV/bin/hyprstream" simulate "$@" ;;
    test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
    *) echo "usage: scripts/dev.sh {simulate|test|setup} [ARGS...]" >&2; exit 2 ;;
esac
