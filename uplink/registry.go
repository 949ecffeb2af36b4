package uplink

// setRegistryTopic sets the down topic of device registries (§3.6) when
// a Registry handler takes them.
func (u *Uplink) setRegistryTopic(t string) {
	if u.cfg.Registry != nil {
		u.topics.downRegistry = t
	}
}

// downTopics are the topics subscribed at QoS 1 at every connect.
func (u *Uplink) downTopics() map[string]byte {
	m := map[string]byte{u.topics.downRentals: 1, u.topics.downCommands: 1}
	if u.topics.downRegistry != "" {
		m[u.topics.downRegistry] = 1
	}
	return m
}
