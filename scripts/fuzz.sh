#!/usr/bin/env bash
# Runs every fuzz target of edged for a set time each and prints how many
# inputs each one fuzzed. `go test` alone runs only the committed seeds
# (testdata/fuzz/ and f.Add); this explores beyond them.
#
#   scripts/fuzz.sh                  # 30 s per target
#   FUZZTIME=5m scripts/fuzz.sh      # longer
#   scripts/fuzz.sh FuzzStationRental FuzzParseConfig   # only these
#
# A failing input is written to the package's testdata/fuzz/<Target>/ by
# go test; commit it with the fix, so it stays a regression seed.
set -u
cd "$(dirname "$0")/.."
FUZZTIME=${FUZZTIME:-30s}
# Minimizing each new input can stall a run for up to a minute; keep it
# short so the time goes to fuzzing.
MINIMIZE=${FUZZMINIMIZETIME:-5s}

# package target, one a line.
targets=$(grep -rl --include=fuzz_test.go '^func Fuzz' . |
	while read -r f; do
		d=$(dirname "$f")
		grep -o '^func Fuzz[A-Za-z0-9_]*' "$f" | sed "s|^func |$d |"
	done
	# serial/modbus keeps its fuzz targets beside its codec tests.
	grep -o '^func Fuzz[A-Za-z0-9_]*' serial/modbus/codec_test.go | sed 's|^func |./serial/modbus |')

if [ $# -gt 0 ]; then
	want=" $* "
	targets=$(echo "$targets" | while read -r p t; do case "$want" in *" $t "*) echo "$p $t" ;; esac; done)
fi

fail=0
summary=""
while read -r pkg target; do
	[ -n "$target" ] || continue
	log=$(mktemp)
	start=$(date +%s)
	go test -run '^$' -fuzz "^${target}\$" -fuzztime "$FUZZTIME" -fuzzminimizetime "$MINIMIZE" "$pkg" >"$log" 2>&1
	rc=$?
	secs=$(($(date +%s) - start))
	execs=$(grep -o 'execs: [0-9]*' "$log" | tail -1 | awk '{print $2}')
	status=ok
	if [ $rc -ne 0 ]; then
		status=FAIL
		fail=1
		sed -n '1,60p' "$log"
	fi
	line=$(printf '%-28s %-18s %12s inputs %5ss %s' "$target" "$pkg" "${execs:-0}" "$secs" "$status")
	echo "$line"
	summary+="$line"$'\n'
	rm -f "$log"
done <<<"$targets"

echo
echo "fuzzed for $FUZZTIME each:"
printf '%s' "$summary"
exit $fail
