package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/serial"
	"go.yaml.in/yaml/v3"
)

// defaultConfigPath is read when it exists and no -config is given (§9).
const defaultConfigPath = "/etc/edged/edged.yaml"

// configError is one mistake in a config file, with its line.
type configError struct {
	Line    int
	Path    string
	Message string
}

// configErrors is every mistake found in a config file, in line order.
type configErrors struct {
	File string
	Errs []configError
}

func (e *configErrors) Error() string {
	var b strings.Builder
	for i, ce := range e.Errs {
		if i > 0 {
			b.WriteByte('\n')
		}
		switch {
		case ce.Line > 0 && ce.Path != "":
			fmt.Fprintf(&b, "%s:%d: %s: %s", e.File, ce.Line, ce.Path, ce.Message)
		case ce.Line > 0:
			fmt.Fprintf(&b, "%s:%d: %s", e.File, ce.Line, ce.Message)
		case ce.Path != "":
			fmt.Fprintf(&b, "%s: %s: %s", e.File, ce.Path, ce.Message)
		default:
			fmt.Fprintf(&b, "%s: %s", e.File, ce.Message)
		}
	}
	return b.String()
}

// loadConfig reads the config at path over the built-in defaults. An empty
// path means the default file when it exists, else the defaults alone.
func loadConfig(path string) (edged.Config, error) {
	if path == "" {
		if _, err := os.Stat(defaultConfigPath); err != nil {
			cfg := edged.DefaultConfig()
			return cfg, cfg.Validate(serial.CheckProfile)
		}
		path = defaultConfigPath
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return edged.Config{}, fmt.Errorf("read config: %w", err)
	}
	return parseConfig(path, data)
}

var yamlLine = regexp.MustCompile(`^line (\d+): (.*)$`)

// parseConfig decodes a config strictly: unknown keys, values of the wrong
// type and values the contract forbids are errors naming the key and line.
func parseConfig(name string, data []byte) (edged.Config, error) {
	cfg := edged.DefaultConfig()
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return cfg, &configErrors{File: name, Errs: []configError{yamlSyntax(err)}}
	}
	idx := indexNode(&root)
	if len(bytes.TrimSpace(data)) > 0 {
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
			var te *yaml.TypeError
			if !errors.As(err, &te) {
				return cfg, &configErrors{File: name, Errs: []configError{yamlSyntax(err)}}
			}
			ce := &configErrors{File: name}
			for _, msg := range te.Errors {
				e := configError{Message: msg}
				if m := yamlLine.FindStringSubmatch(msg); m != nil {
					e.Line, _ = strconv.Atoi(m[1])
					e.Message = cleanYAMLMessage(m[2])
					e.Path = idx.byLine[e.Line]
				}
				ce.Errs = append(ce.Errs, e)
			}
			return cfg, ce
		}
	}
	if err := cfg.Validate(serial.CheckProfile); err != nil {
		var fes edged.ConfigErrors
		if !errors.As(err, &fes) {
			return cfg, err
		}
		ce := &configErrors{File: name}
		for _, fe := range fes {
			ce.Errs = append(ce.Errs, configError{Line: idx.line(fe.Path), Path: fe.Path, Message: fe.Message})
		}
		sort.SliceStable(ce.Errs, func(i, j int) bool { return ce.Errs[i].Line < ce.Errs[j].Line })
		return cfg, ce
	}
	return cfg, nil
}

func yamlSyntax(err error) configError {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	if m := yamlLine.FindStringSubmatch(msg); m != nil {
		n, _ := strconv.Atoi(m[1])
		return configError{Line: n, Message: m[2]}
	}
	return configError{Message: msg}
}

var goType = regexp.MustCompile(`in type edged\.\w+`)

func cleanYAMLMessage(s string) string {
	s = goType.ReplaceAllString(s, "here")
	s = strings.ReplaceAll(s, "field ", "unknown key ")
	s = strings.ReplaceAll(s, " not found here", " (not a config key here)")
	return s
}

// nodeIndex maps key paths such as "devices[2].id" to lines and back.
type nodeIndex struct {
	byPath map[string]int
	byLine map[int]string
}

func indexNode(root *yaml.Node) *nodeIndex {
	idx := &nodeIndex{byPath: map[string]int{}, byLine: map[int]string{}}
	var walk func(n *yaml.Node, path string)
	walk = func(n *yaml.Node, path string) {
		switch n.Kind {
		case yaml.DocumentNode:
			for _, c := range n.Content {
				walk(c, path)
			}
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				k, v := n.Content[i], n.Content[i+1]
				p := k.Value
				if path != "" {
					p = path + "." + k.Value
				}
				idx.byPath[p] = k.Line
				if _, ok := idx.byLine[k.Line]; !ok || len(p) > len(idx.byLine[k.Line]) {
					idx.byLine[k.Line] = p
				}
				if v.Line != k.Line {
					if _, ok := idx.byLine[v.Line]; !ok {
						idx.byLine[v.Line] = p
					}
				}
				walk(v, p)
			}
		case yaml.SequenceNode:
			for i, c := range n.Content {
				p := fmt.Sprintf("%s[%d]", path, i)
				idx.byPath[p] = c.Line
				if _, ok := idx.byLine[c.Line]; !ok {
					idx.byLine[c.Line] = p
				}
				walk(c, p)
			}
		}
	}
	walk(root, "")
	return idx
}

// line finds the line of path, or of its nearest ancestor in the file.
func (idx *nodeIndex) line(path string) int {
	for p := path; p != ""; {
		if n, ok := idx.byPath[p]; ok {
			return n
		}
		i := strings.LastIndexAny(p, ".[")
		if i < 0 {
			break
		}
		p = p[:i]
	}
	return 0
}
