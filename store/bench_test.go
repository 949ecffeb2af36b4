package store

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// processWriteBytes reads write_bytes of /proc/self/io: bytes this process
// caused to reach the block layer. It returns -1 where that is unknown.
func processWriteBytes() int64 {
	f, err := os.Open("/proc/self/io")
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "write_bytes: "); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return -1
			}
			return n
		}
	}
	return -1
}

// BenchmarkCommit commits one device.event per op from 1 and 64
// goroutines. It reports events/s, the file's growth per event and the
// bytes written to the block device per event (/proc/self/io; includes
// bbolt's page rewrites and meta pages, not the journal).
func BenchmarkCommit(b *testing.B) {
	for _, committers := range []int{1, 64} {
		b.Run(fmt.Sprintf("committers=%d", committers), func(b *testing.B) {
			path := filepath.Join(b.TempDir(), "edged.db")
			db := openTest(b, path, Options{})
			ctx := context.Background()
			e := deviceEvent(0)
			fi, err := os.Stat(path)
			if err != nil {
				b.Fatal(err)
			}
			size0, io0 := fi.Size(), processWriteBytes()

			b.ResetTimer()
			start := time.Now()
			var wg sync.WaitGroup
			per := b.N / committers
			for w := range committers {
				n := per
				if w == 0 {
					n += b.N % committers
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range n {
						if _, err := db.Commit(ctx, edged.Change{Events: []edged.Event{e}}); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()

			fi, err = os.Stat(path)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "events/s")
			b.ReportMetric(float64(fi.Size()-size0)/float64(b.N), "file-B/event")
			if io1 := processWriteBytes(); io0 >= 0 && io1 >= 0 {
				b.ReportMetric(float64(io1-io0)/float64(b.N), "disk-B/event")
			}
		})
	}
}
