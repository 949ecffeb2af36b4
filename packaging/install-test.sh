#!/usr/bin/env bash
# Install test of the edged .deb in a throwaway Debian 12 root:
# install, run until READY, upgrade keeping an edited config, remove, purge.
#
#   sudo bash packaging/install-test.sh
#
# Needs root (chroot, mounts) and a Debian mirror for the first run only:
# the minbase bookworm root is cached as a tar under
# ${EDGED_CACHE:-$HOME/.cache/edged}/bookworm-rootfs.tar. debootstrap,
# systemd (for systemd-analyze) and lintian are installed if missing.
#
# Environment:
#   EDGED_CACHE     cache directory (see above)
#   EDGED_MIRROR    Debian mirror for debootstrap (default deb.debian.org)
#   EDGED_MAIN_DIR  passed to build.sh (build from another main package)
#   KEEP=1          keep the work directory for a post-mortem
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${EDGED_CACHE:-${HOME:-/root}/.cache/edged}
rootfs_tar="$cache/bookworm-rootfs.tar"
mirror=${EDGED_MIRROR:-http://deb.debian.org/debian}
start=$SECONDS
failures=0

pass() { echo "PASS: $*"; }
fail() {
	echo "FAIL: $*"
	failures=$((failures + 1))
}
die() {
	echo "FAIL: $*"
	echo "install-test: FAILED after $((SECONDS - start))s"
	exit 1
}
# check DESCRIPTION COMMAND...: PASS or FAIL by the command's exit status.
check() {
	local what=$1
	shift
	if "$@" >/dev/null 2>&1; then pass "$what"; else fail "$what"; fi
}

[[ $(id -u) == 0 ]] || die "run as root (chroot and mounts need it)"

# Tools on the host.
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v lintian >/dev/null || need+=(lintian)
command -v dpkg-deb >/dev/null || need+=(dpkg-dev)
if ((${#need[@]})); then
	echo "install-test: installing ${need[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

work=$(mktemp -d /tmp/edged-install-test.XXXXXX)
root="$work/root"
mounted=()
helper_pid=""
daemon_pid=""
cleanup() {
	local m
	[[ -n $daemon_pid ]] && kill -KILL "$daemon_pid" 2>/dev/null
	[[ -n $helper_pid ]] && kill "$helper_pid" 2>/dev/null
	for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
		m=${mounted[i]}
		umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
	done
	if [[ ${KEEP:-0} == 1 ]]; then
		echo "install-test: kept $work"
	else
		rm -rf --one-file-system "$work"
	fi
}
trap cleanup EXIT

# 1. Two builds of the amd64 package, the second one a higher version.
echo "== build"
EDGED_ARCHES=amd64 LINTIAN=0 EDGED_DIST="$work/dist1" bash "$top/packaging/build.sh" >"$work/build1.log" 2>&1 ||
	{ cat "$work/build1.log"; die "build of the first package"; }
deb1=$(ls "$work"/dist1/edged_*_amd64.deb)
v1=$(dpkg-deb -f "$deb1" Version)
v2="$v1+upgrade1"
EDGED_VERSION=$v2 EDGED_ARCHES=amd64 LINTIAN=0 EDGED_DIST="$work/dist2" bash "$top/packaging/build.sh" >"$work/build2.log" 2>&1 ||
	{ cat "$work/build2.log"; die "build of the upgrade package"; }
deb2="$work/dist2/edged_${v2}_amd64.deb"
dpkg --compare-versions "$v2" gt "$v1" || die "$v2 does not sort above $v1"
pass "built $v1 and $v2 ($(du -k "$deb1" | cut -f1) KiB)"
go build -o "$work/notifywait" "$top/packaging/notifywait" || die "build of notifywait"

echo "== unit"
bash "$top/packaging/check-unit.sh" "$work/dist1/build/amd64/edged" || fail "unit checks"

echo "== lintian"
if lintian --fail-on error,warning "$deb1" >"$work/lintian.log" 2>&1; then
	pass "lintian: no errors or warnings"
else
	cat "$work/lintian.log"
	fail "lintian"
fi

# 2. The Debian 12 root, from the cache or debootstrap.
echo "== root"
mkdir -p "$root"
if [[ ! -s $rootfs_tar ]]; then
	echo "install-test: debootstrap bookworm (cached afterwards in $rootfs_tar)"
	mkdir -p "$cache"
	debootstrap --variant=minbase bookworm "$work/bootstrap" "$mirror" >"$work/debootstrap.log" 2>&1 ||
		{ tail -20 "$work/debootstrap.log"; die "debootstrap"; }
	rm -rf "$work/bootstrap/var/cache/apt/archives/"*.deb
	tar --numeric-owner -C "$work/bootstrap" -cf "$rootfs_tar.tmp" . && mv "$rootfs_tar.tmp" "$rootfs_tar"
	rm -rf --one-file-system "$work/bootstrap"
fi
tar --numeric-owner -C "$root" -xf "$rootfs_tar"
size=$(du -sk "$root" | cut -f1)
mount -t proc proc "$root/proc" && mounted+=("$root/proc")
mount --bind /dev "$root/dev" && mounted+=("$root/dev")
pass "bookworm root ready ($((size / 1024)) MiB)"

in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
# Modes and owners as the root's own passwd and group files name them.
mode_owner() { in_root stat -c '%a %U:%G' "$1" 2>/dev/null; }
config=/etc/edged/edged.yaml
# pkg FIELD: one dpkg-query field of the edged package in the root.
pkg() { in_root dpkg-query -W -f="\${$1}" edged; }

# 3. Install.
echo "== install $v1"
cp "$deb1" "$deb2" "$root/tmp/"
in_root dpkg -i "/tmp/$(basename "$deb1")" </dev/null >"$work/install.log" 2>&1 ||
	{ cat "$work/install.log"; die "dpkg -i $v1"; }
pass "dpkg -i $v1"
check "package state is installed" test "$(pkg Status) $(pkg Version)" = "install ok installed $v1"

pw=$(in_root getent passwd edged || true)
IFS=: read -r _ _ uid _ _ home shell <<<"$pw"
if [[ -n $pw && $uid -lt 1000 && $home == /var/lib/edged && $shell == */nologin ]]; then
	pass "system user edged (uid $uid, home $home, shell $shell)"
else
	fail "system user edged: '$pw'"
fi
check "edged is in group dialout" grep -Eq '^dialout:[^:]*:[0-9]+:(.*,)?edged(,|$)' "$root/etc/group"
check "edged group exists" in_root getent group edged
check "/usr/bin/edged is 755 root:root" test "$(mode_owner /usr/bin/edged)" = "755 root:root"
check "$config is 640 root:edged" test "$(mode_owner $config)" = "640 root:edged"
check "/var/lib/edged is 750 edged:edged" test "$(mode_owner /var/lib/edged)" = "750 edged:edged"
check "unit is 644 root:root" test "$(mode_owner /lib/systemd/system/edged.service)" = "644 root:root"
check "$config is a conffile" grep -q "$config" <(pkg Conffiles)
check "unit enabled (multi-user.target.wants link)" test -L "$root/etc/systemd/system/multi-user.target.wants/edged.service"
check "man page and copyright installed" test -f "$root/usr/share/man/man1/edged.1.gz" -a -f "$root/usr/share/doc/edged/copyright"
if out=$(in_root /usr/bin/edged version 2>&1) && [[ $out == *"$v1"* ]]; then
	pass "edged version: $out"
else
	fail "edged version says '$out', want it to contain $v1"
fi
if out=$(in_root chroot --userspec=edged:edged / /usr/bin/edged check-config -config $config 2>&1); then
	pass "edged check-config accepts the packaged config"
else
	fail "edged check-config on the packaged config: $out"
fi

# 4. Run the installed binary with the installed config, as systemd would
# (user edged, group dialout, a notify socket and a 2s watchdog), in its own
# network namespace so that its ports cannot clash with the host's.
echo "== run"
mkdir -p "$root/run/edged-test"
"$work/notifywait" -socket "$root/run/edged-test/notify.sock" -for 90s >"$work/notify.log" 2>&1 &
helper_pid=$!
for _ in $(seq 50); do [[ -S $root/run/edged-test/notify.sock ]] && break; sleep 0.1; done
touch "$work/edged.log"
run=(chroot --userspec=edged:edged --groups=dialout "$root"
	env -i PATH=/usr/bin:/bin NOTIFY_SOCKET=/run/edged-test/notify.sock WATCHDOG_USEC=2000000
	JOURNAL_STREAM="$(stat -c '%d:%i' "$work/edged.log")"
	/usr/bin/edged -config "$config")
if command -v unshare >/dev/null && command -v ip >/dev/null && unshare --net true 2>/dev/null; then
	unshare --net sh -c 'ip link set lo up && exec "$@"' sh "${run[@]}" >>"$work/edged.log" 2>&1 &
else
	"${run[@]}" >>"$work/edged.log" 2>&1 &
fi
daemon_pid=$!
t0=$SECONDS
ready=0
while ((SECONDS - t0 < 30)); do
	if grep -q '^READY=1\|| READY=1\|READY=1 |' "$work/notify.log"; then
		ready=1
		break
	fi
	kill -0 "$daemon_pid" 2>/dev/null || break
	sleep 0.2
done
if ((ready)); then
	pass "edged reported READY=1 after $((SECONDS - t0))s"
else
	fail "no READY=1 within 30s; edged log:"
	tail -20 "$work/edged.log"
fi
# With WatchdogSec=2s pings come every second: wait up to 5s for one.
for _ in $(seq 50); do grep -q 'WATCHDOG=1' "$work/notify.log" && break; sleep 0.1; done
check "edged pings the watchdog (WATCHDOG=1)" grep -q 'WATCHDOG=1' "$work/notify.log"
check "edged reports a STATUS=" grep -q 'STATUS=' "$work/notify.log"
grep -m1 -o 'STATUS=[^|]*' "$work/notify.log" | sed 's/^/  /' || true
kill -TERM "$daemon_pid" 2>/dev/null || true
rc=""
for _ in $(seq 150); do
	if ! kill -0 "$daemon_pid" 2>/dev/null; then
		wait "$daemon_pid" && rc=0 || rc=$?
		break
	fi
	sleep 0.1
done
if [[ -z $rc ]]; then
	kill -KILL "$daemon_pid" 2>/dev/null || true
	wait "$daemon_pid" 2>/dev/null || true
	fail "edged did not stop within 15s of SIGTERM"
elif [[ $rc == 0 ]]; then
	pass "edged stopped cleanly on SIGTERM"
else
	fail "edged exited $rc on SIGTERM"
fi
daemon_pid=""
check "edged sent STOPPING=1 on SIGTERM" grep -q 'STOPPING=1' "$work/notify.log"
kill "$helper_pid" 2>/dev/null || true
wait "$helper_pid" 2>/dev/null || true
helper_pid=""
state_files=$(find "$root/var/lib/edged" -mindepth 1 | wc -l)
check "edged wrote its state under /var/lib/edged ($state_files entries)" test "$state_files" -gt 0
check "state is owned by edged" test -z "$(in_root find /var/lib/edged ! -user edged -print -quit 2>&1)"
# JOURNAL_STREAM named the log file, as journald would name its stream: every
# line must carry a <N> priority and no time= of its own.
if [[ -s $work/edged.log ]] && ! grep -qv '^<[0-7]>' "$work/edged.log" && ! grep -q 'time=' "$work/edged.log"; then
	pass "journald log format: $(head -1 "$work/edged.log" | cut -c1-80)"
else
	fail "log lines are not in journald format (<N> prefix, no time=):"
	head -5 "$work/edged.log"
fi

# 5. Upgrade, keeping an edited config.
echo "== upgrade to $v2"
sed -i 's/^  name: ""$/  name: "install test"/' "$root$config"
check "config edited" grep -q 'name: "install test"' "$root$config"
in_root dpkg -i "/tmp/$(basename "$deb2")" </dev/null >"$work/upgrade.log" 2>&1 ||
	{ cat "$work/upgrade.log"; die "dpkg -i $v2"; }
pass "dpkg -i $v2 (upgrade)"
check "version is now $v2" test "$(pkg Version)" = "$v2"
check "edited config kept" grep -q 'name: "install test"' "$root$config"
check "no .dpkg-new/.dpkg-dist left beside the config" test -z "$(find "$root/etc/edged" -mindepth 1 ! -name edged.yaml)"
check "$config still 640 root:edged" test "$(mode_owner $config)" = "640 root:edged"
check "state kept across upgrade" test "$(find "$root/var/lib/edged" -mindepth 1 | wc -l)" -eq "$state_files"
check "unit still enabled" test -L "$root/etc/systemd/system/multi-user.target.wants/edged.service"
if out=$(in_root /usr/bin/edged version 2>&1) && [[ $out == *"$v2"* ]]; then
	pass "upgraded binary runs: $out"
else
	fail "upgraded edged version says '$out'"
fi

# 6. Remove: binary and unit go, config and state stay.
echo "== remove"
in_root dpkg -r edged </dev/null >"$work/remove.log" 2>&1 || { cat "$work/remove.log"; die "dpkg -r"; }
pass "dpkg -r edged"
check "package state is config-files" test "$(pkg Status)" = "deinstall ok config-files"
check "binary removed" test ! -e "$root/usr/bin/edged"
check "unit removed" test ! -e "$root/lib/systemd/system/edged.service"
check "config kept after remove" grep -q 'name: "install test"' "$root$config"
check "state kept after remove" test "$(find "$root/var/lib/edged" -mindepth 1 | wc -l)" -eq "$state_files"

# 7. Purge: config, state and unit links go.
echo "== purge"
in_root dpkg -P edged </dev/null >"$work/purge.log" 2>&1 || { cat "$work/purge.log"; die "dpkg -P"; }
pass "dpkg -P edged"
check "package unknown to dpkg" test -z "$(pkg Status 2>/dev/null)"
check "/var/lib/edged removed on purge" test ! -e "$root/var/lib/edged"
check "/etc/edged removed on purge" test ! -e "$root/etc/edged"
check "no unit links left" test -z "$(find "$root/etc/systemd" -name 'edged*' 2>/dev/null)"

echo
if ((failures)); then
	echo "install-test: $failures check(s) FAILED in $((SECONDS - start))s"
	exit 1
fi
echo "install-test: all checks PASSED in $((SECONDS - start))s"
