package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stationedge/edged"
	"golang.org/x/crypto/bcrypt"
)

var ctx = context.Background()

func TestHashSecret(t *testing.T) {
	var out strings.Builder
	if err := run(ctx, []string{"hash-secret"}, strings.NewReader("s3cret\n"), &out, &out); err != nil {
		t.Fatal(err)
	}
	hash := strings.TrimSpace(out.String())
	if err := bcrypt.CompareHashAndPassword([]byte(hash), []byte("s3cret")); err != nil {
		t.Fatalf("hash %q does not match: %v", hash, err)
	}
	if err := run(ctx, []string{"hash-secret"}, strings.NewReader(""), &out, &out); err == nil {
		t.Fatal("empty secret accepted")
	}
}

func TestKeygenAndSignRental(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "rental.key")
	var pubOut strings.Builder
	if err := run(ctx, []string{"keygen", "-out", keyFile}, nil, &pubOut, &pubOut); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(keyFile)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode = %v, %v; want 0600", fi.Mode(), err)
	}
	pub, err := edged.ParseVerifyKey(strings.TrimSpace(pubOut.String()))
	if err != nil {
		t.Fatal(err)
	}
	if err := run(ctx, []string{"keygen", "-out", keyFile}, nil, &pubOut, &pubOut); err == nil {
		t.Fatal("keygen overwrote an existing key")
	}

	msg := `{"op":"grant","rental_id":"r-1","device_id":"chair-1","renter_id":"u-9","duration_s":900,"not_after":"2026-11-27T10:00:00.5Z"}`
	var signed strings.Builder
	if err := run(ctx, []string{"sign-rental", "-key", keyFile, "-station", "mall-1"}, strings.NewReader(msg), &signed, &signed); err != nil {
		t.Fatal(err)
	}
	m, err := edged.ParseRentalMessage([]byte(signed.String()))
	if err != nil {
		t.Fatal(err)
	}
	if err := edged.VerifyRental(pub, "mall-1", m); err != nil {
		t.Fatalf("signed message does not verify: %v", err)
	}
	if err := edged.VerifyRental(pub, "mall-2", m); err == nil {
		t.Fatal("signature verifies for another station")
	}
	var obj map[string]any
	json.Unmarshal([]byte(signed.String()), &obj)
	if obj["not_after"] != "2026-11-27T10:00:00.5Z" || obj["duration_s"] != 900.0 {
		t.Fatalf("signed message changed its fields: %v", obj)
	}
}

func TestVersionAndUnknownCommand(t *testing.T) {
	var out strings.Builder
	if err := run(ctx, []string{"version"}, nil, &out, &out); err != nil || !strings.Contains(out.String(), edged.Version) {
		t.Fatalf("version: %q, %v", out.String(), err)
	}
	if err := run(ctx, []string{"frobnicate"}, nil, &out, &out); err == nil {
		t.Fatal("unknown command accepted")
	}
}
