#!/usr/bin/env bash
# Install checkov, the security scanner of tests/deploy/test_checkov.py, into its own virtual
# environment: its pins (packaging, networkx, ...) conflict with the project's, so it never goes
# into .venv. Then point the test at it:
#   bash deploy/security/install-checkov.sh            # -> /tmp/rarechange-checkov
#   export RARECHANGE_CHECKOV=/tmp/rarechange-checkov/bin/checkov
set -euo pipefail
VERSION=3.3.30 # the version deploy/security/checkov-skips.yaml was reviewed with
VENV=${1:-/tmp/rarechange-checkov}
PYTHON=${PYTHON:-python3.11}
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "checkov==$VERSION"
"$VENV/bin/checkov" --version
echo "export RARECHANGE_CHECKOV=$VENV/bin/checkov"
