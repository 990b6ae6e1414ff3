#!/usr/bin/env bash
# The test suite against the newest jax, jaxlib, flax and optax releases (CI's second leg).
#
# JAX 0.11 and later need Python 3.12 or newer; this script uses the newest Python >= 3.12
# it finds (on PATH, or in pyenv's versions). PyTorch's CPU build exists here for Python
# 3.11 only, so this environment has no torch: the PyTorch parity tests and the notebooks
# are left to the pinned leg (see conftest.py at the top of the repository), and every
# other test and docstring example runs.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local c v
  for c in python3.14 python3.13 python3.12 \
           "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.1[2-9]*/bin/python3; do
    if command -v "$c" >/dev/null 2>&1 || [ -x "$c" ]; then
      v=$("$c" -c 'import sys; print(sys.version_info >= (3, 12))' 2>/dev/null || true)
      [ "$v" = "True" ] && { echo "$c"; return 0; }
    fi
  done
  return 1
}

if ! py=$(find_python); then
  echo "test_newest_jax.sh: no Python 3.12 or newer on this machine (needed by JAX 0.11+)." >&2
  echo "Install one (e.g. 'pyenv install 3.12') and run this script again." >&2
  exit 1
fi
echo "newest-JAX leg: $("$py" --version) from $py"
rm -rf .venv-newest
"$py" -m venv .venv-newest
. .venv-newest/bin/activate
quiet() { grep -v "^WARNING: Location" || true; }  # this machine's pip config lists local folders
pip install -q --upgrade pip 2>&1 | quiet
# The newest jax, jaxlib, flax and optax; the test tools as pinned (a newer type checker
# is not what this leg tests).
grep -E '^(mypy)==' constraints.txt > .venv-newest/tools-pins.txt
pip install -q --upgrade -c .venv-newest/tools-pins.txt -e '.[test]' jax jaxlib flax optax 2>&1 | quiet
python -c 'import jax, jaxlib, flax, optax; print("versions: jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, "optax", optax.__version__)'
pytest -p no:cacheprovider "$@"
