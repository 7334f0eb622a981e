#!/usr/bin/env python3
"""Hostile-input trials (issue 18's list, repeated on a new binary): each feeds vmm what a
hostile peer, a careless user or a stray file would, and records what happened: the outcome
(vmm's own error line), the exit code and the time. Not part of the suite: the integration
tests check each behaviour; this prints the table a person reads.

    tools/hostile-trials.py [--vmm target/release/vmm] [--json] [--only NAME,...]

Each row's `ok` says whether the outcome is the documented one; the exit status is 1 if any row
is not. Python because a hostile peer is a few lines of it (frames built by hand, as the
original trials did).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "hostile:" + "ab" * 32
OTHER_KEY = "hostile:" + "cd" * 32


# --- the migration protocol's frames (vmm/src/migration/protocol.rs) ---------------------------

# protocol.rs `VERSION`: a peer speaking another is refused before anything else is read.
PROTOCOL_VERSION = 3


def frame(kind, payload, seq=0):
    head = struct.pack("<4sHHQI", b"VMMF", PROTOCOL_VERSION, kind, seq, len(payload))
    return head + struct.pack("<I", zlib.crc32(head + payload) & 0xFFFFFFFF) + payload


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed")
        b += c
    return b


def recv_frame(s):
    _magic, _ver, kind, _seq, length, _crc = struct.unpack("<4sHHQII", recv_exact(s, 24))
    return kind, recv_exact(s, length)


# --- the page-server protocol's frames (vmm/src/snapshot/page_proto.rs) ------------------------

def ps_frame(kind, payload):
    return struct.pack("<4sHHII", b"VPSF", 1, kind, 0, len(payload)) + payload


# --- processes -----------------------------------------------------------------------------------

class Proc:
    """A vmm process in the background, its stderr collected."""

    def __init__(self, args, env=None):
        e = dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=e)
        self.err = b""
        self.out = b""
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()
        self.o = threading.Thread(target=self._read_out, daemon=True)
        self.o.start()

    def _read(self):
        for chunk in iter(lambda: self.p.stderr.read1(65536), b""):
            self.err += chunk

    def _read_out(self):
        for chunk in iter(lambda: self.p.stdout.read1(65536), b""):
            self.out += chunk

    def wait_for(self, text, limit=30):
        end = time.time() + limit
        while time.time() < end:
            if text.encode() in self.err:
                return True
            if self.p.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def finish(self, limit=60):
        try:
            self.p.wait(limit)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.t.join(5)
        self.o.join(5)
        return self.p.returncode

    def error_line(self):
        lines = [l for l in self.err.decode(errors="replace").splitlines() if "error" in l.lower()]
        return lines[-1] if lines else ""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def run(args, limit=60, env=None):
    e = dict(os.environ)
    e.update(env or {})
    t = time.time()
    try:
        r = subprocess.run(args, capture_output=True, timeout=limit, env=e)
        code, err = r.returncode, r.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired:
        code, err = None, "(timed out: killed)"
    lines = [l for l in err.splitlines() if "error" in l.lower()]
    return code, (lines[-1] if lines else err.strip()[-200:]), time.time() - t


class Trials:
    def __init__(self, vmm, work):
        self.vmm = vmm
        self.work = work
        self.rows = []

    def row(self, name, given, outcome, code, secs, ok):
        self.rows.append({"trial": name, "input": given, "outcome": outcome.strip()[:300],
                          "exit": code, "seconds": round(secs, 2), "ok": bool(ok)})
        print(f"[{'ok' if ok else 'FAIL'}] {name}: exit {code}, {secs:.2f} s: {outcome[:160]}",
              file=sys.stderr)

    def path(self, name):
        return os.path.join(self.work, name)

    def keyfile(self, name, key):
        p = self.path(name)
        with open(p, "w") as f:
            f.write(key + "\n")
        os.chmod(p, 0o600)
        return p

    def micro_source(self, name, extra=()):
        sock = self.path(name + ".sock")
        p = Proc([self.vmm, "run", "--micro", "--passes", "0", "--console", "none",
                  "--api-socket", sock, *extra])
        end = time.time() + 20
        while not os.path.exists(sock) and time.time() < end:
            time.sleep(0.02)
        return p, sock

    def remote(self, sock, *args, limit=90):
        return run([self.vmm, "remote", "--api-socket", sock, *args], limit)

    def state(self, sock):
        r = subprocess.run([self.vmm, "remote", "--api-socket", sock, "status", "--json"],
                           capture_output=True, timeout=30)
        try:
            return json.loads(r.stdout)["state"]
        except (ValueError, KeyError):
            return "?"

    def stop(self, p):
        p.p.terminate()
        p.finish(20)

    # --- the link -------------------------------------------------------------------------------

    def fake_source_to_tls_destination(self):
        port = free_port()
        dst = Proc([self.vmm, "run", "--incoming", f"tcp://127.0.0.1:{port}", "--tls-psk",
                    self.keyfile("k1", KEY), "--console", "none"])
        dst.wait_for("waiting for an incoming migration")
        t = time.time()
        s = socket.create_connection(("127.0.0.1", port))
        hello = {"vm": {"vcpus": 1, "mem_bytes": 64 << 20}, "mode": "Precopy", "session": 7,
                 "source_host": "evil"}
        s.sendall(frame(1, json.dumps(hello).encode()))
        code = dst.finish(60)
        s.close()
        out = dst.error_line()
        self.row("fake source, plain TCP", "a Hello frame written raw to a `--tls-psk` destination",
                 out, code, time.time() - t, code not in (0, None) and "accepted" not in
                 dst.err.decode(errors="replace"))

    def wrong_key(self):
        port = free_port()
        dst = Proc([self.vmm, "run", "--incoming", f"tcp://127.0.0.1:{port}", "--tls-psk",
                    self.keyfile("k1", KEY), "--console", "none"])
        dst.wait_for("waiting for an incoming migration")
        src, sock = self.micro_source("wrongkey")
        code, out, secs = self.remote(sock, "migrate", "--to", f"tcp://127.0.0.1:{port}",
                                      "--tls-psk", self.keyfile("k2", OTHER_KEY))
        dcode = dst.finish(30)
        state = self.state(sock)
        self.stop(src)
        self.row("source with another key", "`migrate --tls-psk` with a key the destination lacks",
                 f"{out} | destination exit {dcode}: {dst.error_line()} | source {state}", code,
                 secs, code not in (0, None) and dcode not in (0, None) and state == "running")

    def no_credentials(self):
        code, out, secs = run([self.vmm, "run", "--incoming", "tcp://127.0.0.1:1", "--console",
                               "none"], 20)
        self.row("no link credentials", "`run --incoming` with neither --tls-* nor --insecure",
                 out, code, secs, code not in (0, None) and "--insecure" in out)

    def capture_hello(self, extra=()):
        """A genuine Hello: a micro source migrates (--insecure) to this script, which keeps
        its Hello and refuses it."""
        port = free_port()
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", port))
        lst.listen(1)
        got = {}

        def serve():
            c, _ = lst.accept()
            got["hello"] = recv_frame(c)[1]
            c.sendall(frame(3, b"captured by tools/hostile-trials.py"))
            c.close()

        th = threading.Thread(target=serve, daemon=True)
        th.start()
        src, sock = self.micro_source("capture", extra)
        self.remote(sock, "migrate", "--to", f"tcp://127.0.0.1:{port}", "--insecure")
        th.join(30)
        self.stop(src)
        lst.close()
        return json.loads(got["hello"])

    def hello_naming_host_files(self):
        disk = self.path("disk.img")
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        hello = self.capture_hello(["--disk", disk])
        secret = self.path("host-secret.img")
        with open(secret, "wb") as f:
            f.write(b"\0" * 123457)
        hello["vm"]["disks"][0]["path"] = secret
        port = free_port()
        dst = Proc([self.vmm, "run", "--incoming", f"tcp://127.0.0.1:{port}", "--insecure",
                    "--console", "none"])
        dst.wait_for("waiting for an incoming migration")
        t = time.time()
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(frame(1, json.dumps(hello).encode()))
        kind, reason = recv_frame(s)
        s.close()
        code = dst.finish(30)
        text = reason.decode(errors="replace")
        self.row("Hello naming a host file as disk", "peer names a 123457-byte host file; "
                 "destination has no --disk", f"kind {kind}: {text}", code, time.time() - t,
                 kind == 3 and "123457" not in text and secret not in text)

    def gdt_near_the_top(self):
        src, sock = self.micro_source("gdt")
        snap = self.path("snap-gdt")
        self.remote(sock, "snapshot", "--to", snap)
        self.stop(src)
        vmj = os.path.join(snap, "vm.json")
        with open(vmj) as f:
            v = json.load(f)
        sregs = v["state"]["vcpus"][0]["sregs"]
        # kvm_sregs: 8 segments of 24 bytes, then gdt { base u64, limit u16 }.
        sregs[192:200] = list(struct.pack("<Q", (1 << 64) - 0x10))
        sregs[200:202] = [0xFF, 0xFF]
        with open(vmj, "w") as f:
            json.dump(v, f)
        # The snapshot's guest runs until told to stop: the question is whether the restore
        # gets past its setup (the old code looped for ever there) to a refusal or a running VM.
        api = self.path("gdt-restored.sock")
        t = time.time()
        p = Proc([self.vmm, "restore", snap, "--lazy", "--demand", "memslot-exits", "--console",
                  "none", "--api-socket", api])
        state = "?"
        while time.time() - t < 30 and p.p.poll() is None:
            if os.path.exists(api):
                state = self.state(api)
                if state == "running":
                    break
            time.sleep(0.1)
        secs = time.time() - t
        if p.p.poll() is None:
            self.stop(p)
            outcome, code = f"restored VM {state} after {secs:.1f} s (set-up ended)", None
        else:
            outcome, code = p.error_line(), p.p.returncode
        self.row("GDT base near 2^64", "vm.json with gdt.base = 2^64-16, lazy restore with "
                 "--demand memslot-exits", outcome, code, secs,
                 state == "running" or code not in (0, None))

    def hostile_abort_text(self):
        port = free_port()
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", port))
        lst.listen(1)

        def serve():
            c, _ = lst.accept()
            recv_frame(c)
            text = "\x1b[2J\x1b]0;owned\x07\x1b[31mgone\x1b[0m\r\n" + "A" * (1 << 20)
            c.sendall(frame(13, text.encode()))
            time.sleep(1)
            c.close()

        th = threading.Thread(target=serve, daemon=True)
        th.start()
        src, sock = self.micro_source("abort")
        code, out, secs = self.remote(sock, "migrate", "--to", f"tcp://127.0.0.1:{port}",
                                      "--insecure")
        state = self.state(sock)
        self.stop(src)
        lst.close()
        self.row("peer's Abort text", "escape sequences + 1 MiB of text in an Abort",
                 f"{out[:200]} ({len(out)} chars) | source {state}", code, secs,
                 "\x1b" not in out and len(out) < 2048 and state == "running")

    def silent_destination(self):
        port = free_port()
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", port))
        lst.listen(1)
        hold = []

        def serve():
            c, _ = lst.accept()
            hold.append(c)
            recv_frame(c)

        threading.Thread(target=serve, daemon=True).start()
        src, sock = self.micro_source("silent")
        code, out, secs = self.remote(sock, "migrate", "--to", f"tcp://127.0.0.1:{port}",
                                      "--insecure", limit=120)
        state = self.state(sock)
        self.stop(src)
        for c in hold:
            c.close()
        lst.close()
        self.row("silent destination", "reads the Hello, then says nothing", f"{out} | source "
                 f"{state}", code, secs, code not in (0, None) and "timed out" in out and
                 state == "running")

    # --- the control API ------------------------------------------------------------------------

    def api_socket(self):
        src, sock = self.micro_source("api")
        mode = stat.S_IMODE(os.stat(sock).st_mode)
        t = time.time()
        r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                            self.vmm, "remote", "--api-socket", sock, "status"],
                           capture_output=True, timeout=30)
        other = r.stderr.decode(errors="replace").strip().splitlines()
        self.row("API from another uid", f"`remote status` as uid 65534 (socket mode "
                 f"{mode:o})", other[-1] if other else "", r.returncode, time.time() - t,
                 mode == 0o600 and r.returncode != 0)
        # The snapshot's memory file is a symlink to a victim: nothing is followed or overwritten.
        victim = self.path("victim")
        with open(victim, "w") as f:
            f.write("precious")
        snap = self.path("snap-link")
        os.mkdir(snap, 0o700)
        os.symlink(victim, os.path.join(snap, "memory"))
        code, out, secs = self.remote(sock, "snapshot", "--to", snap)
        with open(victim) as f:
            intact = f.read() == "precious"
        self.row("snapshot onto a symlink", "`snapshot --to DIR`, DIR/memory a symlink to a "
                 "victim file", f"{out} | victim intact: {intact}", code, secs,
                 code not in (0, None) and intact)
        # 17 idle connections: the 17th is told the server is busy.
        conns = []
        for _ in range(16):
            c = socket.socket(socket.AF_UNIX)
            c.connect(sock)
            conns.append(c)
        time.sleep(0.3)
        t = time.time()
        c = socket.socket(socket.AF_UNIX)
        c.connect(sock)
        c.settimeout(10)
        try:
            answer = c.recv(4096).decode(errors="replace").strip()
        except OSError as e:
            answer = f"({e})"
        self.row("17th API connection", "16 idle connections held open, then one more", answer,
                 None, time.time() - t, "busy" in answer or "too many" in answer)
        for x in conns + [c]:
            x.close()
        # SIGTERM: the run ends and its socket file goes.
        t = time.time()
        src.p.send_signal(signal.SIGTERM)
        code = src.finish(30)
        self.row("SIGTERM", "SIGTERM to a running vmm with an API socket",
                 f"socket left behind: {os.path.exists(sock)}", code, time.time() - t,
                 not os.path.exists(sock))
        # A regular file at the socket path is not deleted.
        plain = self.path("plain.sock")
        with open(plain, "w") as f:
            f.write("mine")
        code, out, secs = run([self.vmm, "run", "--micro", "--passes", "10", "--console", "none",
                               "--api-socket", plain], 30)
        with open(plain) as f:
            kept = f.read() == "mine"
        self.row("API socket path is a file", "--api-socket naming an existing regular file",
                 f"{out} | file kept: {kept}", code, secs, code not in (0, None) and kept)

    def sandbox(self):
        src, sock = self.micro_source("sandbox")
        time.sleep(0.5)
        fields = []
        for tid in sorted(os.listdir(f"/proc/{src.p.pid}/task")):
            try:
                with open(f"/proc/{src.p.pid}/task/{tid}/status") as f:
                    st = dict(l.split(":", 1) for l in f if ":" in l)
                fields.append((st["Name"].strip(), st.get("Seccomp", "?").strip()))
            except OSError:
                pass
        self.stop(src)
        unfiltered = [n for n, s in fields if s != "2"]
        self.row("sandbox", "threads of a running `vmm run --micro --api-socket`",
                 f"{len(fields)} threads, seccomp filter on all but: {unfiltered or 'none'}",
                 None, 0.0, fields and not unfiltered)

    # --- files ------------------------------------------------------------------------------

    def special_files(self):
        fifo = self.path("fifo")
        os.mkfifo(fifo)
        snap = self.path("snap-fifo")
        os.mkdir(snap)
        os.mkfifo(os.path.join(snap, "vm.json"))
        zsnap = self.path("snap-zero")
        os.mkdir(zsnap)
        os.symlink("/dev/zero", os.path.join(zsnap, "vm.json"))
        for given, args in [
            ("--payload FIFO", ["run", "--payload", fifo, "--console", "none"]),
            ("--payload /dev/zero", ["run", "--payload", "/dev/zero", "--console", "none"]),
            ("--kernel FIFO", ["run", "--kernel", fifo, "--console", "none"]),
            ("--disk FIFO", ["run", "--micro", "--disk", fifo, "--console", "none"]),
            ("snapshot vm.json FIFO", ["restore", snap, "--console", "none"]),
            ("snapshot vm.json -> /dev/zero", ["restore", zsnap, "--console", "none"]),
        ]:
            code, out, secs = run([self.vmm, *args], 30)
            self.row(given, given, out, code, secs, code not in (0, None) and secs < 10)

    def silent_page_server(self):
        src, sock = self.micro_source("ps")
        snap = self.path("snap-ps")
        self.remote(sock, "snapshot", "--to", snap)
        self.stop(src)
        ps = self.path("ps.sock")
        lst = socket.socket(socket.AF_UNIX)
        lst.bind(ps)
        lst.listen(4)
        hold = []

        def serve():
            c, _ = lst.accept()
            hold.append(c)
            head = recv_exact(c, 16)
            recv_exact(c, struct.unpack("<I", head[12:16])[0])
            c.sendall(ps_frame(2, b'{"session":1,"pid":4242}'))

        threading.Thread(target=serve, daemon=True).start()
        code, out, secs = run([self.vmm, "restore", snap, "--lazy", "--demand", "uffd-missing",
                               "--page-server", ps, "--console", "none"], 120,
                              env={"VMM_PAGE_SERVER_SILENCE_MS": "3000"})
        for c in hold:
            c.close()
        lst.close()
        self.row("silent page server", "answers the handshake, then says nothing (uffd-missing; "
                 "silence limit 3 s)", out, code, secs, code not in (0, None) and
                 "sent nothing for" in out)

    def log_volume(self):
        t = time.time()
        p = Proc([self.vmm, "run", "--micro", "--passes", "0", "--console", "none"])
        time.sleep(10)
        p.p.terminate()
        code = p.finish(20)
        self.row("log volume", "a micro guest run for 10 s at the default log level",
                 f"{len(p.err)} bytes of stderr", code, time.time() - t, len(p.err) < 64 << 10)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vmm", default=os.path.join(ROOT, "target/release/vmm"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    if not os.path.exists(a.vmm):
        sys.exit(f"{a.vmm} is missing: cargo build --release -p vmm-cli")
    work = tempfile.mkdtemp(prefix="hostile-")
    os.chmod(work, 0o700)
    tr = Trials(a.vmm, work)
    names = [n for n in ["fake_source_to_tls_destination", "wrong_key", "no_credentials",
                         "hello_naming_host_files", "gdt_near_the_top", "hostile_abort_text",
                         "silent_destination", "api_socket", "sandbox", "special_files",
                         "silent_page_server", "log_volume"]
             if not a.only or n in a.only.split(",")]
    try:
        for n in names:
            try:
                getattr(tr, n)()
            except Exception as e:  # a trial that could not run is a failed row, not a crash
                tr.row(n, "(trial harness)", f"could not run: {e!r}", None, 0.0, False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(tr.rows, indent=2))
    else:
        print("| trial | input | outcome | exit | s | ok |")
        print("|---|---|---|---|---|---|")
        for r in tr.rows:
            outcome = r["outcome"].replace("|", "/")
            print(f"| {r['trial']} | {r['input']} | {outcome} | {r['exit']} | {r['seconds']} | "
                  f"{'yes' if r['ok'] else 'NO'} |")
    sys.exit(0 if all(r["ok"] for r in tr.rows) else 1)


if __name__ == "__main__":
    main()
