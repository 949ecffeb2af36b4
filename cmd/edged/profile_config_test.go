package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stationedge/edged"
)

// Each incomplete cloud profile is refused by check-config, naming the key
// and its line, and never showing the secret.
func TestCloudProfileConfigErrors(t *testing.T) {
	const aliyunOK = "uplink:\n  url: tls://a1pk.iot-as-mqtt.cn-shanghai.aliyuncs.com:1883\n  profile: aliyun\n  keepalive: 60s\n" +
		"  aliyun:\n    product_key: a1pk\n    device_name: st01\n    device_secret: s3cr3t-value\n"
	if _, err := parseConfig("edged.yaml", []byte(aliyunOK)); err != nil {
		t.Fatalf("complete aliyun profile refused: %v", err)
	}
	const awsOK = "uplink:\n  url: tls://abc-ats.iot.eu-west-1.amazonaws.com:443\n  profile: aws\n  client_id: st01\n" +
		"  cert_file: /etc/edged/cert.pem\n  key_file: /etc/edged/key.pem\n"
	if _, err := parseConfig("edged.yaml", []byte(awsOK)); err != nil {
		t.Fatalf("complete aws profile refused: %v", err)
	}
	cases := []struct {
		name, yaml string
		want       []string
	}{
		{"unknown profile", "uplink:\n  url: tcp://x\n  profile: azure\n", []string{"edged.yaml:3:", "uplink.profile", "azure"}},
		{"aliyun without product key", strings.Replace(aliyunOK, "    product_key: a1pk\n", "", 1),
			[]string{"edged.yaml:5:", "uplink.aliyun.product_key"}},
		{"aliyun with empty product key", strings.Replace(aliyunOK, "product_key: a1pk", "product_key: \"\"", 1),
			[]string{"edged.yaml:6:", "uplink.aliyun.product_key"}},
		{"aliyun without device name", strings.Replace(aliyunOK, "    device_name: st01\n", "", 1),
			[]string{"edged.yaml:5:", "uplink.aliyun.device_name"}},
		{"aliyun without secret", strings.Replace(aliyunOK, "    device_secret: s3cr3t-value\n", "", 1),
			[]string{"edged.yaml:5:", "uplink.aliyun.device_secret"}},
		{"aliyun without tls", strings.Replace(aliyunOK, "tls://", "tcp://", 1), []string{"edged.yaml:2:", "uplink.url", "TLS"}},
		{"aliyun keepalive too short", strings.Replace(aliyunOK, "keepalive: 60s", "keepalive: 10s", 1),
			[]string{"edged.yaml:4:", "uplink.keepalive", "30s"}},
		{"aliyun keepalive default too long", strings.Replace(aliyunOK, "keepalive: 60s", "keepalive: 21m", 1),
			[]string{"edged.yaml:4:", "uplink.keepalive"}},
		{"aws without cert", strings.Replace(strings.Replace(awsOK, "  cert_file: /etc/edged/cert.pem\n", "", 1), "  key_file: /etc/edged/key.pem\n", "", 1),
			[]string{"edged.yaml:", "uplink.cert_file", "client certificate"}},
		{"aws without key", strings.Replace(awsOK, "  key_file: /etc/edged/key.pem\n", "", 1),
			[]string{"edged.yaml:5:", "uplink.cert_file"}},
		{"aws without tls", strings.Replace(awsOK, "tls://", "tcp://", 1), []string{"edged.yaml:2:", "uplink.url", "TLS"}},
		{"aws topic root too deep", strings.Replace(awsOK, "  client_id: st01\n", "  client_id: st01\n  topic_root: a/b/c/d/e\n", 1),
			[]string{"edged.yaml:5:", "uplink.topic_root", "slashes"}},
		{"aws renter topic too deep", strings.Replace(awsOK, "  client_id: st01\n", "  client_id: st01\n  renter_topic: a/b/c/d/e/f/g/h/{renter_id}\n", 1),
			[]string{"edged.yaml:5:", "uplink.renter_topic", "slashes"}},
		{"aws over ws", strings.Replace(awsOK, "tls://", "ws://", 1), []string{"edged.yaml:2:", "uplink.url"}},
		{"aliyun keys in generic", "uplink:\n  url: tcp://x\n  aliyun:\n    device_secret: zz\n", []string{"edged.yaml:3:", "uplink.aliyun", "aliyun only"}},
		{"negative batch", "uplink:\n  batch_events: -1\n", []string{"edged.yaml:2:", "uplink.batch_events"}},
		{"negative rate", "uplink:\n  max_publish_rate: -5\n", []string{"edged.yaml:2:", "uplink.max_publish_rate"}},
		{"huge message", "uplink:\n  max_message_kb: 999999999\n", []string{"edged.yaml:2:", "uplink.max_message_kb"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseConfig("edged.yaml", []byte(tc.yaml))
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "s3cr3t") {
				t.Errorf("error shows the device secret: %q", err)
			}
		})
	}
}

// Profile defaults fill the keys left at 0, and each can be set.
func TestCloudProfileDefaults(t *testing.T) {
	cases := []struct {
		yaml                string
		profile             string
		batch, rate, sizeKB int
	}{
		{"uplink: {}\n", "generic", 1, 0, 256},
		{"uplink: {profile: aws, url: tls://h, cert_file: c, key_file: k}\n", "aws", 200, 90, 128},
		{"uplink: {profile: aliyun, url: tls://h, aliyun: {product_key: p, device_name: d, device_secret: s}}\n", "aliyun", 200, 25, 256},
		{"uplink: {profile: aws, url: tls://h, cert_file: c, key_file: k, batch_events: 50, max_publish_rate: 10, max_message_kb: 64}\n", "aws", 50, 10, 64},
	}
	for _, tc := range cases {
		cfg, err := parseConfig("edged.yaml", []byte(tc.yaml))
		if err != nil {
			t.Fatalf("%s: %v", tc.yaml, err)
		}
		e := cfg.Uplink.Effective()
		if e.Profile != tc.profile || e.BatchEvents != tc.batch || e.MaxPublishRate != tc.rate || e.MaxMessageKB != tc.sizeKB {
			t.Errorf("%s: effective = %s batch %d rate %d size %d", tc.yaml, e.Profile, e.BatchEvents, e.MaxPublishRate, e.MaxMessageKB)
		}
	}
	// %+v of the whole config never shows the device secret.
	cfg := edged.DefaultConfig()
	cfg.Uplink.Aliyun.DeviceSecret = "s3cr3t-value"
	if s := strings.ToLower(fmtConfig(cfg)); strings.Contains(s, "s3cr3t") {
		t.Errorf("%%+v shows the secret: %s", s)
	}
}

func fmtConfig(c edged.Config) string { return fmt.Sprintf("%+v", c) }

// The configs of docs/clouds.md (docs/examples) pass check-config, each
// with its profile.
func TestCloudExamplesLoad(t *testing.T) {
	files, err := filepath.Glob("../../docs/examples/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no examples: %v", err)
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := parseConfig(filepath.Base(f), data)
		if err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		if _, ok := edged.CloudProfile(cfg.Uplink.Profile); !ok || cfg.Uplink.URL == "" {
			t.Errorf("%s: profile %q url %q", f, cfg.Uplink.Profile, cfg.Uplink.URL)
		}
	}
}
