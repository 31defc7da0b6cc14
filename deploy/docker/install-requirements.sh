#!/bin/sh
# Used by Dockerfile.api and Dockerfile.worker in their build stages (one rule for every image):
#   install-requirements.sh ROLE [EXTRA_INDEX_URL]
# makes the virtualenv /opt/aethercore/venv with requirements/ROLE.txt (copied to /tmp/requirements), from the
# wheelhouse copied to /tmp/wheels when it holds wheels (scripts/wheelhouse.sh ROLE: pip --no-index, nothing is
# downloaded), from the package index otherwise (plus EXTRA_INDEX_URL: the PyTorch index of the torch build).
# PYTHON names the interpreter (default python3).
set -eu
role=$1
extra=${2:-}
"${PYTHON:-python3}" -m venv /opt/aethercore/venv
pip=/opt/aethercore/venv/bin/pip
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if ls /tmp/wheels/*.whl >/dev/null 2>&1; then
  echo "installing requirements/$role.txt from the wheelhouse ($(ls /tmp/wheels/*.whl | wc -l) wheels, no index)"
  "$pip" install --no-index --find-links /tmp/wheels -r "/tmp/requirements/$role.txt"
else
  echo "installing requirements/$role.txt from the package index (wheelhouse/$role is empty)"
  "$pip" install ${extra:+--extra-index-url "$extra"} -r "/tmp/requirements/$role.txt"
fi
"$pip" check
# Nothing installs packages at run time: the image carries no pip.
"$pip" uninstall --yes --quiet pip
