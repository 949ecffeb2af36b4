// Package edged is the domain of the edged station gateway: devices, rentals,
// events and the rules that decide what happens to them. It imports only the
// standard library; the packages beside it wrap the outside worlds (the bbolt
// store, the local MQTT broker, the RS-485 bus, the cloud uplink) and plug
// into the interfaces defined here.
package edged

// Version is the edged release, set at build time with
// -ldflags "-X github.com/stationedge/edged.Version=...".
var Version = "0.0.0-dev"
