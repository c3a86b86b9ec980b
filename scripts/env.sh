# Sourced by scripts/demo.sh, scripts/test.sh and .ci/run: creates .venv on first use
# and (re)installs when pyproject.toml changes. torch is installed first and pinned,
# because an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TEXT2MASK_VENV:-$ROOT/.venv}"
TORCH_SPEC="${TEXT2MASK_TORCH:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
STAMP="$VENV/.text2mask-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/env.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
    # Only the CLIP BPE file is used (to build the SD v1 tokenizer offline for the
    # tiny test model); --no-deps keeps open_clip's torchvision/timm out.
    "$VENV/bin/python" -m pip install -q --no-deps "open_clip_torch==3.3.0"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
