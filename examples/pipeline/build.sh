#!/bin/sh
# The pipeline's build step: dist/ is the artifact the deploy ships (NONSTOP_ARTIFACT points at it).
set -eu
rm -rf dist
mkdir -p dist
cp app.py greeting.py settings.json dist/
python3 -m py_compile dist/app.py dist/greeting.py
# The compiled files were only a syntax check: the artifact holds sources alone (the same bytes, the same hash).
rm -rf dist/__pycache__
