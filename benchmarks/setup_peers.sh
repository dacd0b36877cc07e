#!/usr/bin/env bash
# Make benchmarks/.venv-peers: a clean virtual environment with torch 2.13.0 (CPU), the peer
# libraries of benchmarks/requirements-peers.txt and flowvae itself (editable), so that one
# run of benchmarks/peers.py in one interpreter times every library.
#
#   bash benchmarks/setup_peers.sh            # from the repository root
#   benchmarks/.venv-peers/bin/python benchmarks/peers.py
#
# torch is installed first and on its own: installed later, a peer's loose "torch>=..." would
# be satisfied already, and pip would not fetch a CUDA build.  The last step checks that torch
# is still 2.13.0 after the peers went in.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
venv="$here/.venv-peers"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install --upgrade pip
$pip install "torch==2.13.0"
$pip install -r "$here/requirements-peers.txt"
$pip install -e "$root"
"$venv/bin/python" - <<'PY'
import importlib
import importlib.metadata
import torch
assert torch.__version__.split("+")[0] == "2.13.0", f"torch changed to {torch.__version__}"
print("torch", torch.__version__)
for name, dist in (("pythae", "pythae"), ("normflows", "normflows"), ("pyro", "pyro-ppl"), ("zuko", "zuko"), ("nflows", "nflows"),
                   ("flowvae", "flowvae")):
    try:
        importlib.import_module(name)
        print(name, importlib.metadata.version(dist))
    except Exception as error:  # report every peer, do not stop at the first broken one
        print(name, "FAILED:", type(error).__name__, error)
PY
