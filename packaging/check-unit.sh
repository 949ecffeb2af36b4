#!/usr/bin/env bash
# Checks systemd/edged.service offline, with no running systemd needed:
#   - "systemd-analyze verify" prints nothing (no warning at all),
#   - "systemd-analyze security" rates the exposure 2.5 or lower (printed).
#
#   bash packaging/check-unit.sh [path/to/edged-binary]
#
# verify needs ExecStart's binary and the distribution's units, so the unit
# is checked inside a scratch root holding a copy of /lib/systemd/system and
# the given binary (default: an empty placeholder script).
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
unit="$top/systemd/edged.service"
max_exposure=25 # tenths: 2.5

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
cp -a /lib/systemd/system "$root/usr/lib/systemd/"
cp "$unit" "$root/etc/systemd/system/edged.service"
if [[ $# -gt 0 ]]; then
	install -m 0755 "$1" "$root/usr/bin/edged"
else
	printf '#!/bin/sh\n' >"$root/usr/bin/edged"
	chmod 0755 "$root/usr/bin/edged"
fi

# ExecReload runs /bin/sh, which the scratch root lacks.
mkdir -p "$root/bin"
printf '#!/bin/sh\n' >"$root/bin/sh"
chmod 0755 "$root/bin/sh"

cd "$root"
out=$(systemd-analyze verify --root="$root" edged.service 2>&1) || true
if [[ -n $out ]]; then
	echo "FAIL: systemd-analyze verify edged.service:"
	echo "$out"
	exit 1
fi
echo "PASS: systemd-analyze verify edged.service is clean"

report=$(systemd-analyze security --offline=yes --root="$root" --no-pager edged.service 2>&1) || true
echo "$report" | grep -E '^✗' || true
score=$(echo "$report" | sed -n 's/.*Overall exposure level for edged.service: \([0-9.]*\).*/\1/p')
if [[ -z $score ]]; then
	echo "FAIL: systemd-analyze security gave no score:"
	echo "$report"
	exit 1
fi
if ! systemd-analyze security --offline=yes --root="$root" --threshold="$max_exposure" edged.service >/dev/null 2>&1; then
	echo "FAIL: systemd-analyze security exposure $score is above 2.5"
	exit 1
fi
echo "PASS: systemd-analyze security exposure $score (at most 2.5)"
