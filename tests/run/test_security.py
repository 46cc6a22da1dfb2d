"""Security checks: the Ray a sweep starts keeps its doors shut to anyone without its token.

1. The sweep's local Ray (`orchestrator.run.cluster.init_ray(None, False)`) keeps Ray's
   token authentication on: every port its processes listen on outside loopback refuses a
   request without the token, and serves the same request with it (the refusal is the
   token check, not a broken probe). Ray runs in a subprocess whose environment has no
   RAY_AUTH_MODE (conftest.py turns auth off for the in-process tests).
2. The same probe against a Ray started with RAY_AUTH_MODE=disabled finds open doors: the
   probe can tell the two apart.
3. The token file is Ray's format, private, written whole and once.
(A trial checkpoint that is not plain tensors is refused: tests/assets/test_checkpoints.py.)

The probe is grpcio's generic unary call (raw bytes in and out, an empty request) to a
harmless real method of each Ray service, and urllib for HTTP ports. What the answers mean:
Ray's C++ gRPC servers check the token inside each registered method's handler, so a method
a server does not host answers UNIMPLEMENTED with auth on and off alike, a hosted one
UNAUTHENTICATED without the token; any other answer (OK, INVALID_ARGUMENT, ...) means the
handler ran. UNAVAILABLE or DEADLINE_EXCEEDED is no answer at all. The HTTP servers (Ray's
aiohttp token middleware) answer 401 without a token, 200/404 with it or with auth off.
"""
from __future__ import annotations

import ipaddress
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc          # orch's test extras: grpcio, for a generic unary call
import psutil
import pytest

pytestmark = pytest.mark.timeout(180)


# --------------------------------------------------------------------------------------
# Ray in a subprocess, as a sweep starts it

_CHILD = r"""
import json, os, sys
import ray
import psutil
from orchestrator.run.cluster import init_ray

init_ray(None, False)

@ray.remote
def where():
    return os.getpid()

ray.get([where.remote() for _ in range(2)])    # so that worker processes exist
pids = [os.getpid()] + [p.pid for p in psutil.Process().children(recursive=True)]
print("ORCH-RAY-PIDS " + json.dumps(pids), flush=True)
sys.stdin.readline()                           # stay up until the test is done
ray.shutdown()
"""


@dataclass
class SweepRay:
    pids: list[int]
    token: str | None          # what ~/.ray/auth_token holds (None: auth is off)


@contextmanager
def sweep_ray(tmp_path: Path, auth_mode: str | None):
    """Start Ray as `orch sweep` does, in a subprocess; yield its PIDs and token."""
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
        token_file = home / ".ray" / "auth_token"
        if auth_mode is None:
            assert token_file.is_file(), "Ray made no token: auth is off"
        yield SweepRay(pids, token_file.read_text().strip() if token_file.is_file() else None)
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

BASELINE = "/orch.Probe/Ping"       # no server hosts it: tells a gRPC server from others
# A harmless method of each gRPC service Ray's processes serve, each called with an empty
# request: a server that checks tokens answers UNAUTHENTICATED for the services it hosts
# and UNIMPLEMENTED for the others.
GRPC_PROBES = {
    "/ray.rpc.NodeInfoGcsService/GetClusterId": "gcs_server",
    "/ray.rpc.NodeManagerService/GetSystemConfig": "raylet node manager",
    "/ray.rpc.ObjectManagerService/Pull": "raylet object manager (no objects: a no-op)",
    "/ray.rpc.CoreWorkerService/NumPendingTasks": "core worker (driver and workers)",
    "/ray.rpc.ReporterService/HealthCheck": "dashboard agent (ray[default] only)",
    "/ray.rpc.LogService/ListLogs": "dashboard agent (ray[default] only)",
}
Code = grpc.StatusCode
REFUSED, NOT_HOSTED = Code.UNAUTHENTICATED, Code.UNIMPLEMENTED
NO_ANSWER = {Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED}
# HTTP servers (runtime-env agent; dashboard agent and metrics with ray[default])
HTTP_PROBES = [("GET", "/"), ("GET", "/metrics"), ("POST", "/get_runtime_envs_info")]


def served(code: Code) -> bool:
    """The method's handler ran: past the token check, or there was none."""
    return code not in {REFUSED, NOT_HOSTED, *NO_ANSWER}


def grpc_call(target: str, method: str, token: str | None = None) -> tuple[Code, str]:
    """One unary call with an empty request (raw bytes; no proto classes needed)."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(b"", timeout=5, metadata=metadata)
            return Code.OK, ""
        except grpc.RpcError as err:
            return err.code(), err.details() or ""


def http_call(host: str, port: int, method: str, path: str, token: str | None = None) -> str:
    """'<status> <first bytes>', or 'error ...' when nothing HTTP answered."""
    url = f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never a proxy
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, method=method, headers=headers,
                                     data=b"" if method == "POST" else None)
    try:
        with opener.open(request, timeout=5) as response:
            return f"{response.status} {response.read(60)!r}"
    except urllib.error.HTTPError as err:
        return f"{err.code} {err.read(60)!r}"
    except OSError as err:       # a gRPC server's reply to HTTP/1.1 is no HTTP at all
        return f"error {err!r}"


@dataclass
class Listener:
    pid: int
    process: str
    ip: str
    port: int
    target: str = ""
    protocol: str = ""
    answers: dict = field(default_factory=dict)     # without the token
    with_token: dict = field(default_factory=dict)
    verdict: str = ""          # "protected", "open" or "unclear"

    def __str__(self):
        def show(answers):
            return ", ".join(f"{k} -> {v[0].name} {v[1]!r}" if isinstance(v, tuple)
                             else f"{k} -> {v}" for k, v in answers.items())
        return (f"{self.process} (pid {self.pid}) listening on {self.ip}:{self.port}, "
                f"probed at {self.target} [{self.protocol}]: {self.verdict}; "
                f"{show(self.answers)}" + (f"; with the token: {show(self.with_token)}"
                                           if self.with_token else ""))

    def serves_with_token(self) -> bool:
        """Every request refused without the token is served with it."""
        if self.protocol == "gRPC":
            refused = [m for m, (code, _) in self.answers.items() if code == REFUSED]
            return bool(refused) and all(served(self.with_token[m][0]) for m in refused)
        codes = [a.split()[0] for a in self.with_token.values()]
        return bool(codes) and all(c.isdigit() and c not in ("401", "403") for c in codes)


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


def probe(listener: Listener, token: str | None = None) -> Listener:
    """Ask the port for something without a token, judge the answers; with `token`, ask
    again with it."""
    host = listener.target = _target(listener.ip)
    address = f"[{host}]:{listener.port}" if ":" in host else f"{host}:{listener.port}"
    baseline = grpc_call(address, BASELINE)
    if baseline[0] in (NOT_HOSTED, REFUSED):      # an HTTP/2 server that speaks gRPC
        listener.protocol = "gRPC"
        listener.answers = {BASELINE: baseline} | {m: grpc_call(address, m) for m in GRPC_PROBES}
        codes = [code for code, _ in listener.answers.values()]
        if any(served(c) for c in codes):
            listener.verdict = "open"            # a method ran (or got past the token check)
        elif REFUSED in codes:
            listener.verdict = "protected"
        else:
            listener.verdict = "unclear"         # no known Ray method here: look at it by hand
        if token:
            listener.with_token = {m: grpc_call(address, m, token) for m in GRPC_PROBES}
        return listener
    listener.answers = {f"{m} {p}": http_call(host, listener.port, m, p) for m, p in HTTP_PROBES}
    codes = [a.split()[0] for a in listener.answers.values()]
    if any(c.isdigit() for c in codes):
        listener.protocol = "HTTP"
        if all(c in ("401", "403") for c in codes):
            listener.verdict = "protected"
        else:
            listener.verdict = "open"            # it answered a request that had no token
        if token:
            listener.with_token = {f"{m} {p}": http_call(host, listener.port, m, p, token)
                                   for m, p in HTTP_PROBES}
    else:
        listener.protocol = "unknown"
        listener.answers[BASELINE] = baseline
        listener.verdict = "unclear"
    return listener


def _report(results: list[Listener]) -> str:
    return "\n".join(str(r) for r in results)


# --------------------------------------------------------------------------------------
# Tests

@pytest.mark.e2e
def test_sweep_ray_serves_nothing_without_the_token(tmp_path):
    """Ray as `orch sweep` starts it: each port outside loopback refuses a caller without
    the token (gRPC: UNAUTHENTICATED; HTTP: 401/403) and serves the same call with it."""
    with sweep_ray(tmp_path, auth_mode=None) as ray_:
        results = [probe(listener, ray_.token) for listener in listeners(ray_.pids)]
    print(_report(results))
    assert results, "Ray listened on no address outside loopback: this test checks nothing"
    assert any(r.protocol == "gRPC" and r.verdict == "protected" for r in results)
    doors = [r for r in results if r.verdict != "protected"]
    assert not doors, ("ports that answer without the token (or could not be judged):\n"
                       + _report(doors) + "\n\nall ports:\n" + _report(results))
    deaf = [r for r in results if not r.serves_with_token()]
    assert not deaf, ("ports that refuse even the token, so their refusal proves nothing:\n"
                      + _report(deaf))


@pytest.mark.e2e
def test_probe_finds_the_open_door_when_auth_is_disabled(tmp_path):
    """The same probe against Ray with RAY_AUTH_MODE=disabled: gRPC ports outside loopback
    run the calls (OK) and none asks for a token, so the test above can fail."""
    with sweep_ray(tmp_path, auth_mode="disabled") as ray_:
        assert ray_.token is None
        results = [probe(listener) for listener in listeners(ray_.pids)]
    print(_report(results))
    opened = [r for r in results if r.protocol == "gRPC" and r.verdict == "open"
              and any(code == Code.OK for code, _ in r.answers.values())]
    assert opened, "the probe found no open gRPC port on a Ray without auth:\n" + _report(results)
    assert not any(r.verdict == "protected" for r in results), _report(results)


# --------------------------------------------------------------------------------------
# The token file

def test_the_token_file_is_private_whole_and_made_once(tmp_path, monkeypatch):
    from orchestrator.run.cluster import private_token
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    token = tmp_path / ".ray" / "auth_token"
    private_token()
    first = token.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", first), first        # Ray's own format
    assert token.stat().st_mode & 0o777 == 0o600
    private_token()                                   # a second sweep keeps it
    assert token.read_text() == first
    assert [p.name for p in token.parent.iterdir()] == ["auth_token"]   # no temporary left
    token.chmod(0o644)                                 # made readable by someone else
    private_token()
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() == first
    monkeypatch.setenv("HOME", str(tmp_path / "other"))
    private_token()                                    # another user's: a token of its own
    assert (tmp_path / "other" / ".ray" / "auth_token").read_text() != first
