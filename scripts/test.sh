#!/usr/bin/env bash
# The test suite, on a fresh machine included: sets up .venv (scripts/env.sh), then pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
set +e
python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that must not pass as green.
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
