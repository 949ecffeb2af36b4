package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// scenarioStorm: the reconnect storm after a power cut. Devices with
// cost-10 secrets (bcrypt's default, as a station is provisioned) log in
// once, the gateway is SIGKILLed and restarted, and every device logs in
// again, all at once, each retrying 100 ms after a refusal (a busy
// gateway answers "server unavailable"): the time from READY=1 (edged)
// or the port listening (mosquitto, with a password file) until all are
// CONNACKed and SUBACKed.
func (b *bench) scenarioStorm(t *table) error {
	const n = 200
	hashes := make([]string, n)
	var wg sync.WaitGroup
	work := make(chan int)
	for range runtime.NumCPU() {
		wg.Go(func() {
			for i := range work {
				h, err := bcrypt.GenerateFromPassword([]byte(secret(i)), 10)
				if err != nil {
					panic(err)
				}
				hashes[i] = string(h)
			}
		})
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()

	// edged
	e, err := b.startEdged("storm", edgedOptions{devices: n, hashes: hashes})
	if err != nil {
		return err
	}
	t0 := time.Now()
	f, err := stormFleet(e.addr, n)
	if err != nil {
		e.kill(9)
		return fmt.Errorf("edged first logins: %w", err)
	}
	first := time.Since(t0)
	time.Sleep(2 * time.Second) // whatever edged keeps of the logins reaches its store
	e.kill(9)
	f.close()
	sock := filepath.Join(e.dir, "notify.sock")
	ns, err := listenNotify(sock)
	if err != nil {
		return err
	}
	defer ns.Close()
	if err := e.restart(sock); err != nil {
		return err
	}
	var ready time.Time
	select {
	case ready = <-ns.ready:
	case <-time.After(60 * time.Second):
		e.kill(9)
		return fmt.Errorf("edged: no READY=1 within 60 s")
	}
	f, err = stormFleet(e.addr, n)
	back := time.Since(ready)
	busy := f.refused
	e.kill(15)
	if err != nil {
		return fmt.Errorf("edged storm: %w", err)
	}
	f.close()

	// mosquitto with a password file (its own PBKDF2 hashes).
	dir := b.subdir("storm-passwd")
	pw := filepath.Join(dir, "passwd")
	var sb strings.Builder
	for i := range n {
		fmt.Fprintf(&sb, "%s:%s\n", deviceID(i), secret(i))
	}
	if err := os.WriteFile(pw, []byte(sb.String()), 0o600); err != nil {
		return err
	}
	if out, err := exec.Command("mosquitto_passwd", "-U", pw).CombinedOutput(); err != nil {
		return fmt.Errorf("mosquitto_passwd: %v: %s", err, out)
	}
	m, err := b.startMosquitto("storm", mosqOptions{extra: "password_file " + pw + "\n"})
	if err != nil {
		return err
	}
	f, err = stormFleet(m.addr, n)
	if err != nil {
		m.kill(9)
		return fmt.Errorf("mosquitto first logins: %w", err)
	}
	m.kill(9)
	f.close()
	if err := m.restart(); err != nil {
		return err
	}
	t1 := time.Now()
	f, err = stormFleet(m.addr, n)
	mback := time.Since(t1)
	m.kill(15)
	if err != nil {
		return fmt.Errorf("mosquitto storm: %w", err)
	}
	f.close()
	b.logf("storm: edged first logins %v, back %v after READY; mosquitto back %v", first, back, mback)
	t.add("storm", fmt.Sprintf("%d devices, cost-10 secrets: first logins, all CONNACKed and SUBACKed", n),
		fmt.Sprintf("%.2f s", first.Seconds()), "", "", "")
	t.add("storm", fmt.Sprintf("%d devices after SIGKILL and restart: READY (port, mosquitto) -> all back", n),
		fmt.Sprintf("%.2f s (%d refusals retried)", back.Seconds(), busy), fmt.Sprintf("%.2f s", mback.Seconds()), "< 2 s",
		verdict(back < 2*time.Second, fmt.Sprintf("%.2f s", back.Seconds())))
	return nil
}

// storm is a fleet that logged in all at once.
type storm struct {
	clients []*client
	refused int64 // CONNACKs refused and retried
}

func (s *storm) close() {
	var wg sync.WaitGroup
	for _, c := range s.clients {
		if c != nil {
			wg.Go(c.Close)
		}
	}
	wg.Wait()
}

// stormFleet connects devices 0..n-1 to addr all at once, each with its
// credentials and its commands subscription, retrying a refused or failed
// login every 100 ms for up to 60 s.
func stormFleet(addr string, n int) (*storm, error) {
	s := &storm{clients: make([]*client, n)}
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	deadline := time.Now().Add(60 * time.Second)
	for i := range n {
		wg.Go(func() {
			for {
				o := dialOptions{addr: addr, id: deviceID(i), user: deviceID(i), pass: secret(i), clean: true, window: 1, timeout: 30 * time.Second}
				c, err := dial(o)
				if err == nil {
					err = c.subscribe("devices/"+deviceID(i)+"/commands", 30*time.Second)
					if err != nil {
						c.Close()
					}
				}
				if err == nil {
					s.clients[i] = c
					return
				}
				mu.Lock()
				s.refused++
				mu.Unlock()
				if time.Now().After(deadline) {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("device %d: %w", i, err)
					}
					mu.Unlock()
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		s.close()
		return nil, firstErr
	}
	return s, nil
}
