package cloudemu

import (
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"hash"
	"strings"
)

// AliyunPassword is the MQTT password of an Alibaba Cloud IoT Platform
// device with signmethod hmacsha256: the lower-case hex HMAC-SHA256, keyed
// with the device secret, of "clientId"+clientID+"deviceName"+deviceName+
// "productKey"+productKey+"timestamp"+timestamp (contract §3.5). clientID
// is the part of the MQTT client id before the first '|'.
func AliyunPassword(secret, clientID, deviceName, productKey, timestamp string) string {
	return aliyunSign(sha256.New, secret, clientID, deviceName, productKey, timestamp)
}

// aliyunPasswordSHA1 is the same with signmethod hmacsha1, which the
// service also accepts (its published example uses it).
func aliyunPasswordSHA1(secret, clientID, deviceName, productKey, timestamp string) string {
	return aliyunSign(sha1.New, secret, clientID, deviceName, productKey, timestamp)
}

func aliyunSign(h func() hash.Hash, secret, clientID, deviceName, productKey, timestamp string) string {
	m := hmac.New(h, []byte(secret))
	m.Write([]byte("clientId" + clientID + "deviceName" + deviceName + "productKey" + productKey + "timestamp" + timestamp))
	return hex.EncodeToString(m.Sum(nil))
}

// aliyunClientID is a parsed MQTT client id of the form
// C|securemode=2,signmethod=hmacsha256,timestamp=T|.
type aliyunClientID struct {
	id, secureMode, signMethod, timestamp string
}

func parseAliyunClientID(s string) (aliyunClientID, error) {
	var c aliyunClientID
	id, rest, ok := strings.Cut(s, "|")
	if !ok || id == "" || !strings.HasSuffix(rest, "|") || strings.Count(rest, "|") != 1 {
		return c, errors.New("client id is not C|params|")
	}
	c.id = id
	for _, kv := range strings.Split(strings.TrimSuffix(rest, "|"), ",") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "securemode":
			c.secureMode = v
		case "signmethod":
			c.signMethod = v
		case "timestamp":
			c.timestamp = v
		}
	}
	if c.secureMode != "2" {
		return c, errors.New("securemode is not 2 (tls)")
	}
	if c.signMethod != "hmacsha256" && c.signMethod != "hmacsha1" {
		return c, errors.New("signmethod is not hmacsha256 or hmacsha1")
	}
	if c.timestamp == "" || strings.Trim(c.timestamp, "0123456789") != "" {
		return c, errors.New("timestamp is not decimal")
	}
	return c, nil
}

// checkAliyunLogin verifies a CONNECT's client id, username and password
// against the device triple. The error never contains the password or
// the secret.
func checkAliyunLogin(pk, dn, secret, clientID, username string, password []byte) error {
	c, err := parseAliyunClientID(clientID)
	if err != nil {
		return err
	}
	if username != dn+"&"+pk {
		return errors.New("username is not DN&PK")
	}
	want := AliyunPassword(secret, c.id, dn, pk, c.timestamp)
	if c.signMethod == "hmacsha1" {
		want = aliyunPasswordSHA1(secret, c.id, dn, pk, c.timestamp)
	}
	if !hmac.Equal([]byte(want), password) {
		return errors.New("password does not match the signature")
	}
	return nil
}

// aliyunTopicOK reports whether topic is /PK/DN/user/<levels>, each level
// letters, digits and '_'. With filter true, '+' and a final '#' are
// allowed as levels too.
func aliyunTopicOK(pk, dn, topic string, filter bool) bool {
	rest, ok := strings.CutPrefix(topic, "/"+pk+"/"+dn+"/user/")
	if !ok || rest == "" {
		return false
	}
	levels := strings.Split(rest, "/")
	for i, l := range levels {
		if filter && (l == "+" || (l == "#" && i == len(levels)-1)) {
			continue
		}
		if l == "" {
			return false
		}
		for _, r := range l {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_') {
				return false
			}
		}
	}
	return true
}
