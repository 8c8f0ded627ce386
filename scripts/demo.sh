#!/usr/bin/env bash
# The demo: the whole flow on built-in sample clips, random-weight backbones. Extra args go to `pipeline demo`.
source "$(dirname "$0")/env.sh"
exec pipeline demo "$@"
