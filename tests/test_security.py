"""Security checks.

1. The sweep's local Ray (`orchestrator.sweep._init_ray(None, False)`) keeps Ray's token
   authentication on: every port its processes listen on outside loopback refuses a
   request without the token. Ray runs in a subprocess whose environment has no
   RAY_AUTH_MODE (conftest.py turns auth off for the in-process tests).
2. The same probe against a Ray started with RAY_AUTH_MODE=disabled finds open doors: the
   probe can tell the two apart.
3. A trial checkpoint that is not plain tensors is refused by `load_fitted` without running
   any of its code.

What Ray 2.60 (as installed with ray[tune,data], no grpcio) opens, found with these tests:
gcs_server, raylet (node manager and object manager), and a core worker gRPC server in the
driver and in each worker, all on `::`; the runtime-env agent's aiohttp server on the node
IP. Ray's C++ gRPC servers check the token inside each registered method's handler, so an
unknown method answers UNIMPLEMENTED with auth on and off alike: the probe calls a harmless
real method of each Ray service (empty request) and expects UNAUTHENTICATED (auth off: OK).
The HTTP servers use Ray's aiohttp token middleware: 401 without a token (auth off: 200/404).

grpcio is not installed with orch's Ray extras, so the probe speaks gRPC itself: plain-text
HTTP/2 with prior knowledge and a small HPACK decoder (RFC 7540 / RFC 7541).
"""
from __future__ import annotations

import ipaddress
import json
import os
import pickle
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------------------
# A bare gRPC client: HTTP/2 frames and HPACK, enough for one unary call with no token.

# HPACK static table (RFC 7541 Appendix A), index 1..61
_STATIC_NAMES = (
    ":authority :method :method :path :path :scheme :scheme :status :status :status :status "
    ":status :status :status accept-charset accept-encoding accept-language accept-ranges "
    "accept access-control-allow-origin age allow authorization cache-control "
    "content-disposition content-encoding content-language content-length content-location "
    "content-range content-type cookie date etag expect expires from host if-match "
    "if-modified-since if-none-match if-range if-unmodified-since last-modified link location "
    "max-forwards proxy-authenticate proxy-authorization range referer refresh retry-after "
    "server set-cookie strict-transport-security transfer-encoding user-agent vary via "
    "www-authenticate").split()
_STATIC_VALUES = {2: "GET", 3: "POST", 4: "/", 5: "/index.html", 6: "http", 7: "https",
                  8: "200", 9: "204", 10: "206", 11: "304", 12: "400", 13: "404", 14: "500",
                  16: "gzip, deflate"}
_STATIC = [(name, _STATIC_VALUES.get(i, "")) for i, name in enumerate(_STATIC_NAMES, 1)]
assert len(_STATIC) == 61

# HPACK Huffman code (RFC 7541 Appendix B): bit length of each symbol 0..256 (256 = EOS).
# The code is canonical (codes in order of length, then symbol), so the lengths define it.
_HUFFMAN_LENGTHS = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30]


def _huffman_table() -> dict[tuple[int, int], int]:
    table, code, previous = {}, -1, 0
    for symbol in sorted(range(257), key=lambda s: (_HUFFMAN_LENGTHS[s], s)):
        length = _HUFFMAN_LENGTHS[symbol]
        code = (code + 1) << (length - previous)
        previous = length
        table[(length, code)] = symbol
    return table


_HUFFMAN = _huffman_table()


def huffman_decode(data: bytes) -> bytes:
    out, code, length = bytearray(), 0, 0
    for byte in data:
        for shift in range(7, -1, -1):
            code, length = (code << 1) | ((byte >> shift) & 1), length + 1
            symbol = _HUFFMAN.get((length, code))
            if symbol is not None:
                if symbol == 256:
                    raise ValueError("EOS inside a Huffman string")
                out.append(symbol)
                code, length = 0, 0
    if length > 7 or code != (1 << length) - 1:
        raise ValueError("bad Huffman padding")
    return bytes(out)


class HpackDecoder:
    def __init__(self):
        self.dynamic: list[tuple[str, str]] = []
        self.max_size = 4096

    def _evict(self):
        while self.dynamic and sum(len(n) + len(v) + 32 for n, v in self.dynamic) > self.max_size:
            self.dynamic.pop()

    def _entry(self, index: int) -> tuple[str, str]:
        if 1 <= index <= len(_STATIC):
            return _STATIC[index - 1]
        return self.dynamic[index - len(_STATIC) - 1]

    @staticmethod
    def _int(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
        mask = (1 << prefix) - 1
        value, pos = data[pos] & mask, pos + 1
        if value < mask:
            return value, pos
        shift = 0
        while True:
            byte, pos = data[pos], pos + 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos

    def _str(self, data: bytes, pos: int) -> tuple[str, int]:
        huffman = bool(data[pos] & 0x80)
        length, pos = self._int(data, pos, 7)
        raw = bytes(data[pos:pos + length])
        return (huffman_decode(raw) if huffman else raw).decode("latin-1"), pos + length

    def decode(self, data: bytes) -> list[tuple[str, str]]:
        headers, pos = [], 0
        while pos < len(data):
            byte = data[pos]
            if byte & 0x80:                                  # indexed field
                index, pos = self._int(data, pos, 7)
                headers.append(self._entry(index))
                continue
            if byte & 0xE0 == 0x20:                          # dynamic table size update
                self.max_size, pos = self._int(data, pos, 5)
                self._evict()
                continue
            indexing = byte & 0xC0 == 0x40                   # else: without / never indexed
            index, pos = self._int(data, pos, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, pos = self._str(data, pos)
            value, pos = self._str(data, pos)
            headers.append((name, value))
            if indexing:
                self.dynamic.insert(0, (name, value))
                self._evict()
        return headers


def _hpack_literal(name: str, value: str) -> bytes:
    """Literal field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    def string(text: str) -> bytes:
        raw = text.encode()
        assert len(raw) < 127
        return bytes([len(raw)]) + raw
    return b"\x00" + string(name) + string(value)


_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _CONTINUATION = 0, 1, 3, 4, 6, 7, 9
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
            + struct.pack(">I", stream) + payload)


def grpc_call(host: str, port: int, method: str, message: bytes = b"",
              timeout: float = 5.0) -> dict:
    """One unary gRPC call, no metadata (so no token), over plain-text HTTP/2. Returns
    {"protocol": "h2" | "not-h2" | "closed", "grpc-status": int | None, "grpc-message",
     "rst": error code | None, "raw": the first bytes the server sent}."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    authority = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    result = {"protocol": "closed", "headers": [], "grpc-status": None, "grpc-message": "",
              "rst": None, "raw": b""}
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        block = b"".join(_hpack_literal(n, v) for n, v in (
            (":method", "POST"), (":scheme", "http"), (":path", method),
            (":authority", authority), ("content-type", "application/grpc"),
            ("te", "trailers")))
        body = b"\x00" + struct.pack(">I", len(message)) + message   # uncompressed message
        sock.sendall(_PREFACE + _frame(_SETTINGS, 0, 0) + _frame(_HEADERS, _END_HEADERS, 1, block)
                     + _frame(_DATA, _END_STREAM, 1, body))
        buf, decoder, fragment, end_stream = b"", HpackDecoder(), b"", False
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            buf += chunk
            if len(result["raw"]) < 200:
                result["raw"] += chunk[:200]
            if result["protocol"] == "closed":
                if len(buf) < 9:
                    continue
                if buf[3] != _SETTINGS or buf[5:9] != b"\0\0\0\0":   # h2 servers open so
                    result["protocol"] = "not-h2"
                    break
                result["protocol"] = "h2"
            while len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + length:
                    break
                kind, flags = buf[3], buf[4]
                stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                payload, buf = buf[9:9 + length], buf[9 + length:]
                if kind == _SETTINGS and not flags & _ACK:
                    sock.sendall(_frame(_SETTINGS, _ACK, 0))
                elif kind == _PING and not flags & _ACK:
                    sock.sendall(_frame(_PING, _ACK, 0, payload))
                elif kind == _RST_STREAM and stream == 1:
                    result["rst"] = int.from_bytes(payload[:4], "big")
                    return _grpc_result(result)
                elif kind in (_HEADERS, _CONTINUATION) and stream == 1:
                    if kind == _HEADERS:
                        if flags & _PADDED:
                            payload = payload[1:len(payload) - payload[0]]
                        if flags & _PRIORITY:
                            payload = payload[5:]
                        fragment, end_stream = b"", bool(flags & _END_STREAM)
                    fragment += payload
                    if flags & _END_HEADERS:
                        result["headers"] += decoder.decode(fragment)
                        if end_stream:
                            return _grpc_result(result)
    return _grpc_result(result)


def _grpc_result(result: dict) -> dict:
    for name, value in result["headers"]:
        if name == "grpc-status":
            result["grpc-status"] = int(value)
        elif name == "grpc-message":
            result["grpc-message"] = value
    return result


def test_hpack_decoder_matches_rfc7541_examples():
    """The decoder the probe relies on, against RFC 7541 Appendix C (Huffman, dynamic
    table, eviction)."""
    assert huffman_decode(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")) == b"www.example.com"
    assert huffman_decode(bytes.fromhex("25a849e95bb8e8b4bf")) == b"custom-value"
    decoder = HpackDecoder()
    decoder.decode(bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff"))
    decoder.decode(bytes.fromhex("828684be5886a8eb10649cbf"))
    assert decoder.decode(bytes.fromhex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf")) == [
        (":method", "GET"), (":scheme", "https"), (":path", "/index.html"),
        (":authority", "www.example.com"), ("custom-key", "custom-value")]
    decoder = HpackDecoder()
    decoder.max_size = 256                                     # C.6: table of 256 octets
    decoder.decode(bytes.fromhex(
        "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff"
        "6e919d29ad171863c78f0b97c8e9ae82ae43d3"))
    assert decoder.decode(bytes.fromhex("4883640effc1c0bf")) == [
        (":status", "307"), ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"), ("location", "https://www.example.com")]
    assert [n for n, _ in decoder.dynamic] == [":status", "location", "date", "cache-control"]


# --------------------------------------------------------------------------------------
# Ray in a subprocess, as a sweep starts it

_CHILD = r"""
import json, os, sys
import ray
import psutil
from orchestrator.sweep import _init_ray

_init_ray(None, False)

@ray.remote
def where():
    return os.getpid()

ray.get([where.remote() for _ in range(2)])    # so that worker processes exist
pids = [os.getpid()] + [p.pid for p in psutil.Process().children(recursive=True)]
print("ORCH-RAY-PIDS " + json.dumps(pids), flush=True)
sys.stdin.readline()                           # stay up until the test is done
ray.shutdown()
"""


@contextmanager
def sweep_ray(tmp_path: Path, auth_mode: str | None):
    """Start Ray as `orch sweep` does, in a subprocess; yield the PIDs of its processes."""
    env = dict(os.environ)
    for name in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    if auth_mode is not None:
        env["RAY_AUTH_MODE"] = auth_mode
    # Ray writes its generated token to ~/.ray/auth_token: keep it in this test's folder
    home = tmp_path / "home"
    home.mkdir()
    env["HOME"] = str(home)
    stderr = (tmp_path / "ray-child.err").open("w")
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                             cwd=tmp_path)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in child.stdout], daemon=True).start()
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while not pids:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("Ray did not start in 90 s: "
                                     + (tmp_path / "ray-child.err").read_text()[-3000:])
            if line.startswith("ORCH-RAY-PIDS "):
                pids = json.loads(line.split(" ", 1)[1])
        if auth_mode is None:
            assert (home / ".ray" / "auth_token").is_file(), "Ray made no token: auth is off"
        yield pids
    finally:
        # everything it started, including processes that came up after the PIDs line
        try:
            descendants = psutil.Process(child.pid).children(recursive=True)
            pids = sorted(set(pids) | {p.pid for p in descendants})
        except psutil.NoSuchProcess:
            pass
        try:
            child.stdin.write("\n")
            child.stdin.close()
        except OSError:
            pass
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        for proc in _alive(pids, wait=15):              # Ray's own, left behind
            proc.kill()
        stderr.close()


def _alive(pids, wait: float) -> list:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=wait)
    return alive


# --------------------------------------------------------------------------------------
# Probes

# A harmless method of each gRPC service Ray's processes serve, each called with an empty
# request: a server that checks tokens answers UNAUTHENTICATED for the services it hosts
# and UNIMPLEMENTED for the others (C++ servers check the token in the method's handler).
GRPC_PROBES = {
    "/orch.Probe/Ping": "no such service (baseline)",
    "/ray.rpc.NodeInfoGcsService/GetClusterId": "gcs_server",
    "/ray.rpc.NodeManagerService/GetSystemConfig": "raylet node manager",
    "/ray.rpc.ObjectManagerService/Pull": "raylet object manager (no objects: a no-op)",
    "/ray.rpc.CoreWorkerService/NumPendingTasks": "core worker (driver and workers)",
    "/ray.rpc.ReporterService/HealthCheck": "dashboard agent (ray[default] only)",
    "/ray.rpc.LogService/ListLogs": "dashboard agent (ray[default] only)",
}
UNAUTHENTICATED, UNIMPLEMENTED, OK = 16, 12, 0
# HTTP servers (runtime-env agent; dashboard agent and metrics with ray[default])
HTTP_PROBES = [("GET", "/"), ("GET", "/metrics"), ("POST", "/get_runtime_envs_info")]


@dataclass
class Listener:
    pid: int
    process: str
    ip: str
    port: int
    target: str = ""
    protocol: str = ""
    answers: dict = field(default_factory=dict)
    verdict: str = ""                       # "protected", "open" or "unclear"

    def __str__(self):
        answers = ", ".join(f"{k} -> {v}" for k, v in self.answers.items())
        return (f"{self.process} (pid {self.pid}) listening on {self.ip}:{self.port}, "
                f"probed at {self.target} [{self.protocol}]: {self.verdict}; {answers}")


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _local_addresses() -> tuple[list[str], list[str]]:
    """This machine's own non-loopback addresses (IPv4, IPv6 without link-local)."""
    v4, v6 = [], []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not _is_loopback(a.address):
                v4.append(a.address)
            elif a.family == socket.AF_INET6:
                ip = ipaddress.ip_address(a.address.split("%")[0])
                if not ip.is_loopback and not ip.is_link_local:
                    v6.append(str(ip))
    return v4, v6


def _target(ip: str) -> str:
    """Where to connect to reach a socket bound to `ip`, as a host on the network would:
    for a wildcard bind (:: or 0.0.0.0), one of this machine's own non-loopback addresses
    (IPv6 for ::, else IPv4; a v6 socket on Linux also takes IPv4), and 127.0.0.1 / ::1
    only when the machine has no other address. A socket bound to one address is reached
    there. Every target is an address of this machine: nothing is sent elsewhere."""
    v4, v6 = _local_addresses()
    if ip == "0.0.0.0":
        return v4[0] if v4 else "127.0.0.1"
    if ip == "::":
        return v6[0] if v6 else v4[0] if v4 else "::1"
    assert ip in v4 + v6, f"{ip} is not an address of this machine"
    return ip


def listeners(pids) -> list[Listener]:
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and not _is_loopback(c.laddr.ip):
                found.append(Listener(pid, name, c.laddr.ip, c.laddr.port))
    return found


def _http(host: str, port: int, method: str, path: str) -> str:
    url = f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never a proxy
    request = urllib.request.Request(url, method=method,
                                     data=b"" if method == "POST" else None)
    try:
        with opener.open(request, timeout=5) as response:
            return f"{response.status} {response.read(60)!r}"
    except urllib.error.HTTPError as err:
        return f"{err.code} {err.read(60)!r}"
    except OSError as err:
        return f"error {err!r}"


def probe(listener: Listener) -> Listener:
    """Ask the port for something without a token and judge the answers."""
    host = listener.target = _target(listener.ip)
    first = grpc_call(host, listener.port, "/orch.Probe/Ping")
    if first["protocol"] == "h2":
        listener.protocol = "gRPC"
        statuses = []
        for method in GRPC_PROBES:
            answer = first if method == "/orch.Probe/Ping" else \
                grpc_call(host, listener.port, method)
            status = answer["grpc-status"]
            statuses.append(status)
            listener.answers[method] = (
                f"grpc-status {status} {answer['grpc-message']!r}" if status is not None
                else f"no status (RST_STREAM {answer['rst']}, protocol {answer['protocol']})")
        if any(s not in (UNAUTHENTICATED, UNIMPLEMENTED, None) for s in statuses):
            listener.verdict = "open"            # a method ran (or got past the token check)
        elif UNAUTHENTICATED in statuses:
            listener.verdict = "protected"
        else:
            listener.verdict = "unclear"         # no known Ray method here: look at it by hand
    elif first["raw"].startswith(b"HTTP/"):
        listener.protocol = "HTTP"
        for method, path in HTTP_PROBES:
            listener.answers[f"{method} {path}"] = _http(host, listener.port, method, path)
        codes = [a.split()[0] for a in listener.answers.values()]
        if all(c in ("401", "403") for c in codes):
            listener.verdict = "protected"
        elif any(c.isdigit() for c in codes):
            listener.verdict = "open"            # it answered a request that had no token
        else:
            listener.verdict = "unclear"
    else:
        listener.protocol = "unknown"
        listener.answers["h2 preface"] = repr(first["raw"][:80])
        listener.verdict = "unclear"
    return listener


def _report(results: list[Listener]) -> str:
    return "\n".join(str(r) for r in results)


# --------------------------------------------------------------------------------------
# Tests

def test_sweep_ray_serves_nothing_without_the_token(tmp_path):
    """Ray as `orch sweep` starts it: each port outside loopback refuses a caller without
    the token (gRPC: UNAUTHENTICATED; HTTP: 401/403)."""
    with sweep_ray(tmp_path, auth_mode=None) as pids:
        results = [probe(listener) for listener in listeners(pids)]
    print(_report(results))
    assert results, "Ray listened on no address outside loopback: this test checks nothing"
    assert any(r.protocol == "gRPC" and r.verdict == "protected" for r in results)
    doors = [r for r in results if r.verdict != "protected"]
    assert not doors, ("ports that answer without the token (or could not be judged):\n"
                       + _report(doors) + "\n\nall ports:\n" + _report(results))


def test_probe_finds_the_open_door_when_auth_is_disabled(tmp_path):
    """The same probe against Ray with RAY_AUTH_MODE=disabled: gRPC ports outside loopback
    run the calls (OK) and none asks for a token, so the test above can fail."""
    with sweep_ray(tmp_path, auth_mode="disabled") as pids:
        results = [probe(listener) for listener in listeners(pids)]
    print(_report(results))
    opened = [r for r in results if r.protocol == "gRPC" and r.verdict == "open"
              and any(a.startswith(f"grpc-status {OK} ") for a in r.answers.values())]
    assert opened, "the probe found no open gRPC port on a Ray without auth:\n" + _report(results)
    assert not any(r.verdict == "protected" for r in results), _report(results)


# --------------------------------------------------------------------------------------
# Checkpoints: tensors only

def _make_marker(path: str):
    Path(path).write_text("code from a checkpoint ran")


class _Payload:
    """Unpickling it calls os.mkdir(marker): code run by loading a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class _Opaque:
    """A custom class that is not a tensor; unpickling it would run its __setstate__."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __setstate__(self, state):
        _make_marker(state["marker"])


def _assets():
    """What load_fitted reads from its Assets: the zero-shot classifier to copy."""
    return SimpleNamespace(start=SimpleNamespace(zero_shot=torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("make", [_Payload, _Opaque], ids=["reduce-payload", "custom-class"])
def test_load_fitted_refuses_a_checkpoint_that_is_not_tensors(tmp_path, make):
    from orchestrator.build import load_fitted
    marker = tmp_path / "marker"
    path = tmp_path / "trial.pt"
    torch.save({"classifier": {"weight": make(marker), "bias": torch.zeros(2)},
                "text_tower": None}, path)
    if make is _Payload:
        # the file really carries code: a plain torch.load runs it
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.rmdir()
    with pytest.raises(Exception) as refused:   # pickle.UnpicklingError in torch 2.14
        load_fitted(_assets(), path, torch.device("cpu"))
    assert isinstance(refused.value, (pickle.UnpicklingError, RuntimeError)), refused.value
    assert "weights only" in str(refused.value).lower()
    assert not marker.exists(), "loading the checkpoint ran code from it"


def test_load_fitted_reads_a_plain_tensor_checkpoint(tmp_path):
    """The refusal above is the safe loader, not a broken one: tensors load."""
    from orchestrator.build import load_fitted, save_fitted
    from trainers.methods import Fitted
    trained = torch.nn.Linear(2, 2)
    save_fitted(Fitted(trained), tmp_path / "trial.pt")
    fitted = load_fitted(_assets(), tmp_path / "trial.pt", torch.device("cpu"))
    assert torch.equal(fitted.classifier.weight, trained.weight)
    assert fitted.text_tower is None


def test_the_token_file_is_private_whole_and_made_once(tmp_path, monkeypatch):
    from orchestrator.sweep import _private_token
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    token = tmp_path / ".ray" / "auth_token"
    _private_token()
    first = token.read_text()
    assert len(first) == 64 and int(first, 16) >= 0
    assert token.stat().st_mode & 0o777 == 0o600
    _private_token()                                   # a second sweep keeps it
    assert token.read_text() == first
    assert [p.name for p in token.parent.iterdir()] == ["auth_token"]   # no temporary left
    token.chmod(0o644)                                 # made readable by someone else
    _private_token()
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() == first
