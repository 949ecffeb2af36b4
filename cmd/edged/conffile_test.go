package main

import (
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/stationedge/edged"
	"go.yaml.in/yaml/v3"
)

// configKeys lists every key path of the config, such as "uplink.window",
// without descending into lists and maps.
func configKeys(t reflect.Type, prefix string) []string {
	var out []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name := strings.Split(f.Tag.Get("yaml"), ",")[0]
		if name == "" || name == "-" {
			continue
		}
		p := prefix + name
		out = append(out, p)
		if f.Type.Kind() == reflect.Struct && f.Type.String() != "time.Duration" {
			out = append(out, configKeys(f.Type, p+".")...)
		}
	}
	return out
}

// TestShippedConfigsNameEveryKey checks that the packaged conffile and the
// README's reference both load and show every key edged knows.
func TestShippedConfigsNameEveryKey(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?s)## Configuration.*?```yaml\n(.*?)```").FindSubmatch(readme)
	if m == nil {
		t.Fatal("README has no configuration block")
	}
	conffile, err := os.ReadFile("../../packaging/edged.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{"README.md": m[1], "packaging/edged.yaml": conffile} {
		// The README's example has placeholder hashes; only its keys count.
		if name == "packaging/edged.yaml" {
			if _, err := parseConfig(name, data); err != nil {
				t.Errorf("%s does not load: %v", name, err)
			}
		}
		var root yaml.Node
		if err := yaml.Unmarshal(data, &root); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		idx := indexNode(&root)
		for _, k := range configKeys(reflect.TypeOf(edged.Config{}), "") {
			if _, ok := idx.byPath[k]; !ok {
				t.Errorf("%s does not show the key %s", name, k)
			}
		}
	}
}
