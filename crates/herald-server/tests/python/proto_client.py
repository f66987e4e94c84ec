#!/usr/bin/env python3
"""An independent herald.proto client, for the cross-language test (tests/ws_proto_python.rs).

Uses only the Python standard library and the message classes `protoc --python_out` generates
from proto/herald.proto (module `herald_pb2` on PYTHONPATH): its own WebSocket handshake and
framing, its own varint length prefixes.

Usage: proto_client.py PORT CHANNEL PUBLISH EXPECT
  connects with subprotocol herald.proto, subscribes to CHANNEL, prints READY, publishes
  PUBLISH binary publications (ten commands per frame), reads until EXPECT publications
  arrived, recovers the channel from offset 1 on a new subscription (a reply in parts when
  the server's page bound is small), then prints {"recovered": B, "offsets": [...]}, one JSON
  line per publication ({"offset": N, "hex": "..."}) and one per publish reply
  ({"published": N}), and exits 0. Any protocol surprise exits 1.
"""

import base64
import json
import os
import socket
import struct
import sys

import herald_pb2 as pb


def fail(why):
    print("ERROR " + why, flush=True)
    sys.exit(1)


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf, i):
    shift = 0
    n = 0
    while True:
        if i >= len(buf):
            fail("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


class Ws:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: herald.proto\r\n\r\n" % key
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                fail("closed during the handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            fail("upgrade refused: " + lines[0])
        headers = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:]}
        if headers.get("sec-websocket-protocol") != "herald.proto":
            fail("subprotocol not chosen: %r" % headers.get("sec-websocket-protocol"))

    def send(self, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x82, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x82, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x82, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                fail("the server closed the connection")
            self.buf += chunk

    def message(self):
        """The next whole data message (fragments joined); control frames handled."""
        parts = []
        while True:
            self._need(2)
            b0, b1 = self.buf[0], self.buf[1]
            n = b1 & 0x7F
            i = 2
            if n == 126:
                self._need(4)
                n = struct.unpack("!H", self.buf[2:4])[0]
                i = 4
            elif n == 127:
                self._need(10)
                n = struct.unpack("!Q", self.buf[2:10])[0]
                i = 10
            self._need(i + n)
            payload, self.buf = self.buf[i : i + n], self.buf[i + n :]
            opcode, fin = b0 & 0x0F, b0 & 0x80
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                fail("closed by the server with %r" % code)
            if opcode in (0x9, 0xA):
                continue
            if opcode == 0x1:
                fail("a text frame on a herald.proto connection")
            parts.append(payload)
            if fin:
                return b"".join(parts)


def server_messages(frame):
    i = 0
    while i < len(frame):
        n, i = read_varint(frame, i)
        m = pb.ServerMessage()
        m.ParseFromString(frame[i : i + n])
        i += n
        yield m


def command(**kwargs):
    body = pb.Command(**kwargs).SerializeToString()
    return varint(len(body)) + body


def main():
    port, channel, publish, expect = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ws = Ws(port)
    # connect and subscribe in one frame: several messages per frame.
    ws.send(command(id=1, connect=pb.Connect()) + command(id=2, subscribe=pb.Subscribe(channel=channel)))
    replies = {}
    parts = {}  # id -> publications of a subscribe reply whose parts are still arriving
    pubs = []
    published = []

    def pump():
        for m in server_messages(ws.message()):
            kind = m.WhichOneof("kind")
            if kind == "reply":
                result = m.reply.WhichOneof("result")
                if result == "error":
                    fail("reply %d: error %d %s" % (m.reply.id, m.reply.error.code, m.reply.error.message))
                if result == "subscribe":
                    # A recovery larger than a page: parts with `partial` set, then the last.
                    held = parts.setdefault(m.reply.id, [])
                    held.extend(m.reply.subscribe.publications)
                    if m.reply.subscribe.partial:
                        continue
                    del m.reply.subscribe.publications[:]
                    m.reply.subscribe.publications.extend(parts.pop(m.reply.id))
                replies[m.reply.id] = m.reply
                if result == "publish":
                    published.append(m.reply.publish.offset)
            elif kind == "pub":
                if m.pub.channel != channel:
                    fail("a publication of another channel")
                pubs.append((m.pub.offset if m.pub.HasField("offset") else None, m.pub.data))
            elif kind == "ping":
                ws.send(command(pong=pb.Pong()))
            elif kind == "disconnect":
                fail("disconnected: %d %s" % (m.disconnect.code, m.disconnect.reason))
            # Other kinds (unsub, or kinds of a newer server) are not this test's business.

    while 1 not in replies or 2 not in replies:
        pump()
    if not replies[1].connect.client:
        fail("connect reply without client id")
    print("READY", flush=True)
    next_id = 3
    for start in range(0, publish, 10):
        frame = b""
        for k in range(start, min(start + 10, publish)):
            data = b"\x00py" + k.to_bytes(4, "big")
            frame += command(id=next_id, publish=pb.Publish(channel=channel, data=data))
            next_id += 1
        ws.send(frame)
    while len(pubs) < expect or len(published) < publish:
        pump()
    # Recover the whole stream from offset 1 on a fresh subscription: with the server's small
    # page bound this reply comes in parts, which the client joins.
    epoch = replies[2].subscribe.position.epoch
    unsub, resub = next_id, next_id + 1
    ws.send(
        command(id=unsub, unsubscribe=pb.Unsubscribe(channel=channel))
        + command(
            id=resub,
            subscribe=pb.Subscribe(channel=channel, since=pb.StreamPosition(offset=1, epoch=epoch)),
        )
    )
    while resub not in replies:
        pump()
    sub = replies[resub].subscribe
    print(json.dumps({"recovered": sub.recovered, "offsets": [p.offset for p in sub.publications]}))
    for offset, data in pubs:
        print(json.dumps({"offset": offset, "hex": data.hex()}))
    for offset in published:
        print(json.dumps({"published": offset}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
