#!/usr/bin/env bash
# The test suite. Extra args go to pytest (e.g. scripts/test.sh -k extract).
source "$(dirname "$0")/env.sh"
# One test file per worker (files share expensive fixtures); one worker per core.
exec python -m pytest -q -n auto --dist loadfile "$@"
