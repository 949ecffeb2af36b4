package main

import (
	"context"
	"errors"
	"io"
)

// runDemo runs a whole simulated station in one process.
func runDemo(ctx context.Context, stdout, stderr io.Writer) error {
	return errors.New("demo is not built yet")
}
