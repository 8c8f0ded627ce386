#!/usr/bin/env bash
# The test suite. Extra args go to pytest (e.g. scripts/test.sh -k extract).
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "$@"
