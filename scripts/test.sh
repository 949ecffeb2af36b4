#!/usr/bin/env bash
# Runs every test of edged, installing what the tests need when it is
# missing (Debian's mosquitto, chromium, debootstrap, lintian, python3-paho-mqtt). It is the
# README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v chromium >/dev/null || need+=(chromium)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
command -v lintian >/dev/null || need+=(lintian)
command -v systemd-analyze >/dev/null || need+=(systemd)
# examples/relay.py, the device makers' reference relay, is run by the tests
# with Debian's python3 and paho-mqtt.
/usr/bin/python3 -c 'import paho.mqtt.client' 2>/dev/null || need+=(python3 python3-paho-mqtt)
if [ ${#need[@]} -gt 0 ]; then
	echo "installing ${need[*]}"
	sudo_cmd=()
	[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
	"${sudo_cmd[@]}" apt-get update -qq
	DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"

echo "== go test -race ./..."
go test -race -count=1 -timeout 15m ./...

# Memory per idle device is measured without the race detector, which
# changes every allocation and stack: the tests that do so skip under -race.
echo "== memory per idle device"
go test -count=1 -run 'TestIdleDeviceFootprint' ./local

echo "== packaging: build the .debs and run the install test"
bash packaging/install-test.sh
