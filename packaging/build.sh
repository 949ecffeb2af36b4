#!/usr/bin/env bash
# Builds dist/edged_<version>_{amd64,arm64,armhf}.deb from this checkout:
#
#   bash packaging/build.sh
#
# Binaries are cross-built with CGO_ENABLED=0 (static, no libc dependency);
# armhf uses GOARM=6 so that one .deb runs on every Raspberry Pi, the
# ARMv6 Pi Zero and Pi 1 included. nfpm runs as the Go tool pinned in go.mod.
#
# Environment:
#   EDGED_VERSION   Debian version to stamp (default: derived from git, see
#                   version() below)
#   EDGED_ARCHES    subset to build, e.g. "amd64" (default: amd64 arm64 armhf)
#   EDGED_DIST      output directory (default: dist)
#   EDGED_MAIN_DIR  build the binary from this Go main package directory
#                   instead of ./cmd/edged (for packaging tests only)
#   LINTIAN=0       skip running lintian on the result
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
dist=${EDGED_DIST:-dist}
mkdir -p "$dist"
dist=$(cd "$dist" && pwd)
arches=${EDGED_ARCHES:-amd64 arm64 armhf}

# version maps git describe onto a Debian version that sorts correctly:
#   tag v1.2.3                  -> 1.2.3
#   3 commits after v1.2.3      -> 1.2.3+git20260101120000.3.abc1234
#   no tag at all               -> 0.0.0~git20260101120000.abc1234
#   uncommitted changes         -> the above + ".dirty"
# The timestamp is the commit's (UTC), so a rebuild of one commit gives the
# same version, and later commits sort higher.
version() {
	local desc when dirty=""
	if ! git rev-parse -q --verify HEAD >/dev/null 2>&1; then
		echo "0.0.0~git0.none"
		return
	fi
	desc=$(git describe --tags --always --dirty --abbrev=7 --match 'v[0-9]*')
	when=$(TZ=UTC git log -1 --format=%cd --date=format-local:%Y%m%d%H%M%S)
	if [[ $desc == *-dirty ]]; then
		dirty=".dirty"
		desc=${desc%-dirty}
	fi
	if [[ $desc =~ ^v([0-9][0-9A-Za-z.~+]*)-([0-9]+)-g([0-9a-f]+)$ ]]; then
		echo "${BASH_REMATCH[1]}+git${when}.${BASH_REMATCH[2]}.${BASH_REMATCH[3]}${dirty}"
	elif [[ $desc =~ ^v([0-9][0-9A-Za-z.~+]*)$ ]]; then
		echo "${BASH_REMATCH[1]}${dirty}"
	else
		echo "0.0.0~git${when}.${desc}${dirty}"
	fi
}

ver=${EDGED_VERSION:-$(version)}
if ! dpkg --validate-version "$ver" 2>/dev/null && command -v dpkg >/dev/null; then
	echo "build.sh: '$ver' is not a valid Debian version" >&2
	exit 1
fi
echo "edged $ver"

mkdir -p "$dist"
# dist/ ignores itself, so builds never show up in git status.
[[ -e $dist/.gitignore ]] || echo '*' >"$dist/.gitignore"
for arch in $arches; do
	case $arch in
	amd64) goarch=amd64 goarm= ;;
	arm64) goarch=arm64 goarm= ;;
	armhf) goarch=arm goarm=6 ;;
	*)
		echo "build.sh: unknown arch $arch" >&2
		exit 1
		;;
	esac
	build="$dist/build/$arch"
	rm -rf "$build"
	mkdir -p "$build"
	bin="$build/edged"
	flags=(-trimpath -ldflags "-s -w -buildid= -X github.com/stationedge/edged.Version=$ver")
	if [[ -n ${EDGED_MAIN_DIR:-} ]]; then
		CGO_ENABLED=0 GOOS=linux GOARCH=$goarch GOARM=$goarm go -C "$EDGED_MAIN_DIR" build "${flags[@]}" -o "$bin" .
	else
		CGO_ENABLED=0 GOOS=linux GOARCH=$goarch GOARM=$goarm go build "${flags[@]}" -o "$bin" ./cmd/edged
	fi
	sed -e "s/@VERSION@/$ver/" -e "s/@DATE@/$(date -R -u)/" packaging/changelog |
		gzip -9n >"$build/changelog.gz"
	gzip -9n <packaging/edged.1 >"$build/edged.1.gz"
	deb="$dist/edged_${ver}_${arch}.deb"
	rm -f "$deb"
	EDGED_VERSION=$ver EDGED_ARCH=$arch EDGED_BUILD=$build \
		go tool nfpm package --config packaging/nfpm.yaml --packager deb --target "$deb" >/dev/null
	echo "built $deb ($(du -k "$deb" | cut -f1) KiB)"
done

if [[ ${LINTIAN:-1} != 0 ]] && command -v lintian >/dev/null; then
	for arch in $arches; do
		echo "lintian edged_${ver}_${arch}.deb:"
		lintian --info --display-info --fail-on error "$dist/edged_${ver}_${arch}.deb" || exit 1
	done
fi
