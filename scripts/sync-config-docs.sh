#!/usr/bin/env bash
# Regenerate .env.example and README's configuration table from config/settings.py (the one source).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" manage.py config --format env > .env.example
"$PY" manage.py config --format markdown > /tmp/aethercore-config-table.md
"$PY" - <<'PYEOF'
import re
readme = open("README.md").read()
table = open("/tmp/aethercore-config-table.md").read().strip()
open("README.md", "w").write(re.sub(r"\| variable \| default \| meaning \|\n(\|.*\|\n)+", table + "\n", readme))
PYEOF
