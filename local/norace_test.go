//go:build !race

package local

// raceEnabled: the race detector changes stack and heap sizes.
const raceEnabled = false
