#!/bin/sh
# Check systemd/bms-gateway.service the way CI can: `systemd-analyze verify` on a copy
# whose ExecStart= points at a binary that exists (the real one, /usr/local/bin/bms-gateway,
# is only there after installation), then the offline security review.
#
# Fails on any message verify prints about our unit, on a verify error, and when the
# exposure score rises above THRESHOLD (tenths, as systemd-analyze counts: 20 = 2.0).
#
#   systemd/verify.sh [UNIT-FILE]   # from anywhere; needs systemd-analyze >= 250
#                                   # default: the bms-gateway.service beside this script
set -eu

THRESHOLD=${THRESHOLD:-20}
here=$(cd "$(dirname "$0")" && pwd)
unit=bms-gateway.service
src=${1:-$here/$unit}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Keep the arguments so verify still parses the whole command line.
sed 's|^ExecStart=/usr/local/bin/bms-gateway |ExecStart=/bin/true |' \
    "$src" >"$tmp/$unit"
if ! grep -q '^ExecStart=/bin/true ' "$tmp/$unit"; then
    echo "verify.sh: ExecStart= not in the expected form, update the sed above" >&2
    exit 1
fi

status=0
# --man=no: do not look up man pages named in Documentation= (CI images have none).
out=$(systemd-analyze verify --man=no "$tmp/$unit" 2>&1) || status=$?
# verify also reports on unrelated host units (missing targets in containers); only
# lines about our unit count.
ours=$(printf '%s\n' "$out" | grep -F "$unit" || true)
if [ -n "$ours" ] || [ "$status" -ne 0 ]; then
    printf '%s\n' "$out" >&2
    echo "verify.sh: systemd-analyze verify reported problems (exit $status)" >&2
    exit 1
fi
echo "verify: ok"

status=0
out=$(systemd-analyze security --offline=yes --threshold="$THRESHOLD" --no-pager \
    "$tmp/$unit" 2>&1) || status=$?
if [ "$status" -ne 0 ]; then
    printf '%s\n' "$out" >&2
    echo "verify.sh: exposure above $THRESHOLD/10 (or security review failed)" >&2
    exit 1
fi
printf '%s\n' "$out" | tail -n 1
