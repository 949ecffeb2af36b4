#!/usr/bin/env python3
"""Reference relay of a signed rental grant, for device makers (docs/relay.md).

While the station's internet is down, the renter's phone still has its own:
the cloud gives it the same signed rental message it sends the station, the
phone hands it to the device (BLE, NFC, a typed code), and the device
publishes it on devices/D/grants. edged decides it as if the cloud had sent
it and answers with a `rental_result` command on devices/D/commands.

This script is that device side. It reads the grant from stdin (standing in
for BLE or NFC), connects to the station's broker with the device's own
credentials, relays the grant, and prints what the renter would see.

In firmware, do the same on the device's existing MQTT session: a second
connection with the device's id takes the session over. Run standalone, this
script *is* the device for a moment, so it also acknowledges `start` (where
firmware would start the motor) and `stop`.

    edged sign-rental -key k.pem -station mall-1 < grant.json |
        python3 examples/relay.py --host 192.168.1.10 --device chair-1 --secret ...

Exit status: 0 accepted, 1 refused, 2 no answer (or no connection).
Needs paho-mqtt 1.x or 2.x (Debian: apt-get install python3-paho-mqtt).
"""

import argparse
import json
import queue
import sys
import uuid

import paho.mqtt.client as mqtt

# What a renter should read for each refusal reason (contract §6).
REASONS = {
    "bad_signature": "this code is not valid for this station",
    "invalid": "this code is not for this device",
    "expired": "this code has expired, ask the app for a new one",
    "device_busy": "the device is in use",
    "device_offline": "the device is not reachable",
    "device_fault": "the device is out of order",
    "maintenance": "the device is under maintenance",
    "unknown_device": "the station does not know this device",
    "timeout": "the device did not start",
    "device_error": "the device refused to start",
    "cancelled": "the rental was cancelled",
    "no_rental": "there is no such rental",
    "not_renter": "this rental belongs to someone else",
    "unavailable": "the station cannot take rentals right now, try again",
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--device", required=True, help="device id (also the MQTT username and client id)")
    p.add_argument("--secret", required=True, help="device secret (the MQTT password)")
    p.add_argument("--timeout", type=float, default=30, help="seconds to wait for the answer")
    args = p.parse_args()

    # The grant, exactly as the phone got it. It is published unchanged: the
    # signature covers its fields, and edged checks everything else.
    raw = sys.stdin.buffer.read().strip()
    try:
        grant = json.loads(raw)
        rental_id, op = grant["rental_id"], grant["op"]
    except (ValueError, KeyError, TypeError):
        print("Not a rental message: scan the code again.")
        return 1

    d = args.device
    commands, grants = f"devices/{d}/commands", f"devices/{d}/grants"
    answers = queue.Queue()  # filled by paho's network thread

    # paho-mqtt 2 wants the callback API version; 1.x has no such argument.
    if hasattr(mqtt, "CallbackAPIVersion"):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=d, protocol=mqtt.MQTTv311)
    else:
        client = mqtt.Client(client_id=d, protocol=mqtt.MQTTv311)
    client.username_pw_set(d, args.secret)

    def on_connect(client, userdata, flags, rc, properties=None):
        if rc != 0:
            answers.put(("no_connection", str(rc), None))
            return
        # Subscribe first, so the answer cannot come before we listen.
        client.subscribe(commands, qos=1)

    def on_subscribe(client, userdata, mid, *rest):
        # The grant goes at QoS 1: the broker acknowledges it once the
        # station has recorded its decision.
        client.publish(grants, raw, qos=1)

    def on_message(client, userdata, msg):
        try:
            cmd = json.loads(msg.payload)
            cmd_id, action = cmd["cmd_id"], cmd["action"]
        except (ValueError, KeyError, TypeError):
            return
        # Every command is acknowledged (contract §2), rental_result too:
        # the station resends what it does not hear back about.
        ack = client.publish(f"{commands}/ack", json.dumps({"cmd_id": cmd_id, "ok": True}), qos=1)
        if action == "start":
            print(f"(device) start for {cmd.get('duration_s')} s, rental {cmd.get('rental_id')}", file=sys.stderr)
        elif action == "rental_result":
            a = cmd.get("args") or {}
            if a.get("rental_id") == rental_id and a.get("op") == op:
                answers.put(("result", a, ack))

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    try:
        client.connect(args.host, args.port, keepalive=30)
    except OSError as e:
        print(f"No answer: cannot reach the station ({e}).")
        return 2
    client.loop_start()
    try:
        kind, a, ack = answers.get(timeout=args.timeout)
    except queue.Empty:
        kind, a, ack = "no_answer", None, None
    if ack is not None:
        ack.wait_for_publish(timeout=2)  # let the ack reach the station first
    client.disconnect()
    client.loop_stop()

    if kind == "no_connection":
        print(f"No answer: the station refused the device's login ({a}).")
        return 2
    if kind == "no_answer":
        print("No answer from the station: try again, or use the app.")
        return 2
    # What the renter sees: success and the device id, or why not.
    if a.get("ok"):
        done = {"grant": "started", "extend": "extended", "cancel": "cancelled"}.get(op, "accepted")
        print(f"OK: rental {rental_id} {done} on {a.get('device_id')}.")
        return 0
    reason = a.get("reason", "")
    print(f"Refused: {REASONS.get(reason, 'the station refused it')} ({reason}).")
    return 1


if __name__ == "__main__":
    sys.exit(main())
