#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target: a few hand-written valid inputs each, in the
input layout the target's doc comment describes.

    python3 fuzz/seeds.py fuzz/corpus

scripts/fuzz reads fuzz/corpus/<target> and may replace it with a small minimized corpus (see
that script); run this again to go back to the seeds.
"""
import os, hmac, hashlib, base64, json, struct, sys
root = sys.argv[1]
def put(target, name, data):
    d = os.path.join(root, target); os.makedirs(d, exist_ok=True)
    if isinstance(data, str): data = data.encode()
    open(os.path.join(d, name), 'wb').write(data)

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7f; n >>= 7
        if n: out.append(b | 0x80)
        else: out.append(b); return bytes(out)
def field(num, wt, payload):
    key = varint(num << 3 | wt)
    if wt == 0: return key + varint(payload)
    return key + varint(len(payload)) + payload
def s(num, text): return field(num, 2, text if isinstance(text, bytes) else text.encode())
def msg(num, body): return field(num, 2, body)
def delim(m): return varint(len(m)) + m
def pos(offset, epoch): return field(1, 0, offset) + s(2, epoch)
def cmd(id_, opnum, body): return delim((field(1, 0, id_) if id_ else b'') + msg(opnum, body))

# proto_command: client frames (Command), and server frames (ServerMessage).
put('proto_command', 'subscribe-since', cmd(1, 3, s(1, 'news') + msg(2, pos(3, 'e1'))))
put('proto_command', 'publish-binary', cmd(2, 5, s(1, 'h:a') + s(2, b'\x00\xff')))
put('proto_command', 'connect-token-and-anonymous', cmd(3, 2, s(1, 'abc.def.ghi')) + cmd(4, 2, b''))
put('proto_command', 'history-since-limit', cmd(5, 6, s(1, 'h:a') + msg(2, pos(0, '')) + field(3, 0, 10)))
put('proto_command', 'refresh-pong-unsubscribe', cmd(6, 7, s(1, 'tok')) + cmd(0, 8, b'') + cmd(7, 4, s(1, 'news')))
pub = msg(2, s(1, 'h:a') + field(2, 0, 7) + s(3, 'e1') + s(4, b'{"x":1}'))
publ = lambda o, d: msg(3, field(1, 0, o) + s(2, d))
head = msg(1, field(1, 0, 4) + msg(4, publ(1, b'1') + field(4, 0, 1)))
tail = msg(1, field(1, 0, 4) + msg(4, msg(1, pos(1, 'e')) + field(2, 0, 1)))
err = msg(1, field(1, 0, 5) + msg(2, field(1, 0, 400) + s(2, 'bad')))
put('proto_command', 'server-pub-reply-in-parts-ping', delim(pub) + delim(head) + delim(tail) + delim(msg(3, b'')) + delim(err))
put('proto_command', 'server-disconnect-unsub', delim(msg(4, field(1, 0, 4008) + s(2, 'slow') + field(3, 0, 1))) + delim(msg(5, s(1, 'a') + field(2, 0, 4500) + s(3, 'x'))))

# json_command: client lines (and server lines for the client-side decoder).
put('json_command', 'subscribe-since', '{"op":"subscribe","id":1,"channel":"news","since":{"offset":3,"epoch":"e1"}}')
put('json_command', 'publish-connect', '{"op":"connect","id":1,"token":"a.b.c"}\n{"op":"publish","id":2,"channel":"h:a","data":{"x":[1,2.5,"s"]}}')
put('json_command', 'history-refresh-pong', '{"op":"history","id":3,"channel":"h:a","limit":2,"since":{"offset":1,"epoch":"e"}}\n{"op":"refresh","id":4,"token":"t"}\n{"op":"pong"}')
put('json_command', 'unsubscribe-b64', '{"op":"unsubscribe","id":5,"channel":"news"}\n{"op":"publish","id":6,"channel":"a","b64data":"AAE="}')
put('json_command', 'server-messages', '{"id":1,"ok":{"client":"c1","ping_interval_ms":25000}}\n{"pub":{"channel":"a","offset":2,"epoch":"e","b64data":"AA=="}}\n{"ping":{}}\n{"disconnect":{"code":4008,"reason":"slow","reconnect":true}}')

# ws_decoder: control byte (bit 0 role, rest chunk size) + frames.
def frame(op, payload, masked, fin=True):
    b0 = (0x80 if fin else 0) | op
    n = len(payload)
    hdr = bytes([b0])
    mbit = 0x80 if masked else 0
    if n < 126: hdr += bytes([mbit | n])
    elif n < 65536: hdr += bytes([mbit | 126]) + struct.pack('>H', n)
    else: hdr += bytes([mbit | 127]) + struct.pack('>Q', n)
    if masked:
        key = b'\x01\x02\x03\x04'
        payload = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
        hdr += key
    return hdr + payload
put('ws_decoder', 'client-text-ping', b'\x00' + frame(1, b'{"op":"pong"}', True) + frame(9, b'p', True))
put('ws_decoder', 'client-fragmented-binary', b'\x06' + frame(2, b'ab', True, False) + frame(10, b'', True) + frame(0, b'cd', True))
put('ws_decoder', 'client-close', b'\x02' + frame(8, b'\x03\xe8bye', True))
put('ws_decoder', 'server-text-long', b'\x01' + frame(1, b'x' * 300, False) + frame(8, b'\x0f\xa0', False))

# config: TOML files; lines KEY=VALUE also become flags and HERALD_* variables.
put('config', 'namespaces', '[namespaces.market]\nhistory_size = 1000\nconflate = true\n[channel_defaults]\nanonymous_subscribe = false\n')
put('config', 'auth-limits', 'api_key = "k"\nlog_level = "herald=debug,info"\n[auth]\nhmac_secret = "0123456789abcdef0123456789abcdef"\nleeway_secs = 5\n[limits]\nmax_queue_bytes = 65536\n')
put('config', 'broker-tls', 'broker = "rediss://127.0.0.1:6380"\n[broker_tls]\nca_file = "/tmp/ca.pem"\n')
put('config', 'settings', 'limits.max_connections=100\nnamespaces.chat.history_size=10\nlog_level=warn\n')

# sse_request: channel count byte + Last-Event-ID.
put('sse_request', 'compact', b'\x03' + b'~;AbCd-_xy42;')
put('sse_request', 'compact-malformed', b'\x05' + b'~ABCDEFG!1;short;ABCDEFGH99999999999999999999;;')
put('sse_request', 'named', b'\x02' + b'market:A~e1~42;news;bad name;c~~1')
put('sse_request', 'channel-names', b'\x01' + b'chat:room#alice,bob;a_b-c.d:e@f/g=h')

# token: mode byte (even: text; odd: signed header\nclaims) + token.
SECRET = b'fuzz-secret-0123456789abcdef0123'
def b64(b): return base64.urlsafe_b64encode(b).rstrip(b'=').decode()
def sign(claims, alg='HS256', secret=SECRET):
    h = b64(json.dumps({"alg": alg, "typ": "JWT"}, separators=(',', ':')).encode())
    p = b64(json.dumps(claims, separators=(',', ':')).encode())
    dig = {'HS256': hashlib.sha256, 'HS384': hashlib.sha384, 'HS512': hashlib.sha512}[alg]
    return f'{h}.{p}.' + b64(hmac.new(secret, f'{h}.{p}'.encode(), dig).digest())
put('token', 'valid-hs256', b'\x00' + sign({"sub": "alice", "exp": 4000000000}).encode())
put('token', 'valid-hs512-times', b'\x00' + sign({"sub": "bob", "nbf": 1700000000, "iat": 1799999999.5}, 'HS512').encode())
put('token', 'wrong-secret', b'\x00' + sign({"sub": "eve"}, 'HS384', b'another secret').encode())
put('token', 'signed-claims', b'\x01' + b'{"alg":"HS256","typ":"JWT"}\n{"sub":"alice","exp":1800000003,"nbf":1e3}')
put('token', 'signed-default-header', b'\x05' + b'{"sub":"carol","iat":-1e300}')

# api_router: endpoint byte, options byte (bit 0 protobuf body, 1 protobuf accept, 2 no API
# key, 3 header after the first \n), then body or query.
put('api_router', 'publish-json', b'\x00\x00' + b'{"channel":"h:news","data":{"text":"hello"}}')
put('api_router', 'publish-protobuf', b'\x00\x03' + s(1, 'h:bin') + s(2, b'\x00\x01'))
put('api_router', 'batch-json', b'\x01\x00' + b'{"publications":[{"channel":"h:a","data":1},{"channel":"nope:x","data":2},{"channel":"c:b","b64data":"AAE="}]}')
put('api_router', 'batch-protobuf', b'\x01\x01' + msg(1, s(1, 'h:a') + s(2, b'x')) + msg(1, s(1, 'bad name') + s(2, b'y')))
put('api_router', 'history', b'\x02\x00' + b'channel=h:a&since_offset=1&since_epoch=e&limit=3')
token = sign({"sub": "alice"})
put('api_router', 'sse-token-last-event-id', b'\x03\x08' + f'channel=h:a&channel=news&channel=p:x&token={token}\n~;AbCdEfGh3'.encode())
put('api_router', 'sse-named-resume', b'\x03\x00' + b'channel=h%3Aa&channel=c:b&last_event_id=h:a~e~1;c:b')
put('api_router', 'sse-resume-named', b'\x03\x00' + b'channel=h:a&channel=c:b&last_event_id=h:a~EPOCH~BACK;c:b~e~1')
put('api_router', 'sse-resume-compact', b'\x03\x08' + b'channel=news&channel=h:a\n~;TAGBACK')
put('api_router', 'channels', b'\x04\x00')
put('api_router', 'ws-subprotocols', b'\x05\x08' + b'token=x.y.z\nherald.proto, herald.json, mqtt')
put('api_router', 'disconnect', b'\x06\x00' + b'{"user":"alice","code":4000}')
put('api_router', 'info-metrics-readyz', b'\x07\x00')
