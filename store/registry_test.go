package store

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

func TestRegistryKeptAcrossReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	db, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, ok, err := db.Registry(ctx); ok || err != nil {
		t.Fatalf("fresh store: ok %v err %v, want none", ok, err)
	}
	want := edged.AppliedRegistry{Version: 4, Devices: `[{"id":"a"}]`, AppliedAt: time.Date(2026, 12, 4, 10, 0, 0, 0, time.UTC),
		Result: edged.RegistryResultData{Version: 4, OK: true, Added: 1}}
	if err := db.SaveRegistry(ctx, want); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db, err = Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	got, ok, err := db.Registry(ctx)
	if err != nil || !ok || got.Version != 4 || got.Devices != want.Devices || !got.AppliedAt.Equal(want.AppliedAt) || got.Result.Added != 1 {
		t.Fatalf("after reopen: %+v ok %v err %v, want %+v", got, ok, err, want)
	}
}
