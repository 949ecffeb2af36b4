package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is a process the bench started, in its own process group so that
// kill takes its children with it.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{}
}

var (
	procsMu sync.Mutex
	procs   = map[*proc]bool{} // running, for the cleanup at exit
)

// start runs argv with its output appended to logPath.
func start(name, logPath string, env []string, argv ...string) (*proc, error) {
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: lf, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		close(p.done)
	}()
	procsMu.Lock()
	procs[p] = true
	procsMu.Unlock()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// exited reports whether the process has ended.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends sig to the process group and waits up to 10 s for the
// process to end, then SIGKILLs the group.
func (p *proc) kill(sig syscall.Signal) {
	if p == nil {
		return
	}
	syscall.Kill(-p.pid(), sig)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		syscall.Kill(-p.pid(), syscall.SIGKILL)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
		}
	}
	p.log.Close()
	procsMu.Lock()
	delete(procs, p)
	procsMu.Unlock()
}

// killAll SIGKILLs every process group still running.
func killAll() {
	procsMu.Lock()
	ps := make([]*proc, 0, len(procs))
	for p := range procs {
		ps = append(ps, p)
	}
	procsMu.Unlock()
	for _, p := range ps {
		p.kill(syscall.SIGKILL)
	}
}

// waitPort waits until addr accepts TCP connections or p exits.
func waitPort(p *proc, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		if p != nil && p.exited() {
			return fmt.Errorf("%s exited before listening on %s", p.name, addr)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not listening on %s after %v", p.name, addr, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// procStat is what /proc tells about a process at one moment.
type procStat struct {
	cpuTicks   int64 // utime + stime, in clock ticks
	rssKB      int64 // VmRSS
	hwmKB      int64 // VmHWM
	threads    int64
	writeBytes int64 // /proc/PID/io write_bytes
}

// clkTck is USER_HZ, 100 on every Linux architecture Go supports.
const clkTck = 100

func readStat(pid int) procStat {
	var s procStat
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		// Fields after the command name, which is in parentheses and may
		// hold spaces.
		if i := bytes.LastIndexByte(b, ')'); i > 0 {
			f := strings.Fields(string(b[i+1:]))
			if len(f) > 13 {
				u, _ := strconv.ParseInt(f[11], 10, 64)
				st, _ := strconv.ParseInt(f[12], 10, 64)
				s.cpuTicks = u + st
			}
		}
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), ":")
			if !ok {
				continue
			}
			f := strings.Fields(v)
			if len(f) == 0 {
				continue
			}
			n, _ := strconv.ParseInt(f[0], 10, 64)
			switch k {
			case "VmRSS":
				s.rssKB = n
			case "VmHWM":
				s.hwmKB = n
			case "Threads":
				s.threads = n
			}
		}
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid)); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "write_bytes: "); ok {
				s.writeBytes, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			}
		}
	}
	return s
}

// raiseNoFile lifts the soft open-files limit to the hard one, for this
// process and the brokers it starts.
func raiseNoFile() (uint64, error) {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 0, err
	}
	r.Cur = r.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 0, err
	}
	return r.Cur, nil
}

// notifySocket is a unixgram socket playing systemd's side of sd_notify.
type notifySocket struct {
	path  string
	conn  *net.UnixConn
	ready chan time.Time
}

func listenNotify(path string) (*notifySocket, error) {
	os.Remove(path)
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, err
	}
	n := &notifySocket{path: path, conn: c, ready: make(chan time.Time, 4)}
	go func() {
		buf := make([]byte, 4096)
		for {
			k, err := c.Read(buf)
			if err != nil {
				return
			}
			now := time.Now()
			for _, l := range strings.Split(string(buf[:k]), "\n") {
				if l == "READY=1" {
					select {
					case n.ready <- now:
					default:
					}
				}
			}
		}
	}()
	return n, nil
}

func (n *notifySocket) Close() {
	n.conn.Close()
	os.Remove(n.path)
}

// syscallSignal is a signal for proc.kill.
type syscallSignal = syscall.Signal

// machineBusy is the busy jiffies of all CPUs from /proc/stat (user, nice,
// system, irq, softirq, steal): with the broker's and the bench's own, it
// shows how much of the machine other processes took during a measurement.
func machineBusy() int64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	var busy int64
	for i, v := range f[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		n, _ := strconv.ParseInt(v, 10, 64)
		busy += n
	}
	return busy
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}
