// Package reliability holds edged's reliability and security campaign:
// tests that build and run the real binary and break its world the way a
// station's world breaks: power loss (SIGKILL at random points), a full
// disk, wall clock jumps, connection and publish floods, slowloris on the
// status page, and hours of churn. It has no code of its own beside this
// comment; everything is in its tests.
//
// The CI-sized runs take a few minutes in total under go test -race. The
// long versions run with EDGED_LONG=1 (50 kills, full-size floods, a soak of
// an hour, or EDGED_SOAK=DURATION). See docs/security.md for what each test
// proves.
package reliability
