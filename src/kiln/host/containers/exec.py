"""`kiln exec`, server side: a process in a running container, bridged to an API connection.

The process is started with `ctr tasks exec` (runc puts it in the container's namespaces
and cgroup). With a TTY, ctr runs on a pseudo-terminal we own: a resize frame sets that
terminal's size, the kernel signals ctr (SIGWINCH) and ctr resizes the container's console.
Without one, stdin/stdout/stderr are pipes and the exit status is the process's.

One thread per session, select() on the connection and the process's pipes, nothing
blocking: the process's output is read only while the connection's outbox has room, and
the client's input only while the process keeps up, so neither side can make the other
buffer without bound, and both directions flow at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import socket
import struct
import subprocess
import termios
from collections.abc import Sequence

from kiln.host.api import stream
from kiln.host.containers import ctr
from kiln.host.containers.spec import Spec

HIGH_WATER = 1 << 16  # client input buffered for the process before we stop reading more
SEND_TIMEOUT = 60.0  # the last frames wait this long for a client that reads nothing


def _without_late_resize(data: bytes, tty: bool, kind: bytes) -> bytes:
    """ctr resizes a TTY process's terminal just after starting it and complains when the
    process has already exited: noise for the user, so that one message is dropped.

    (The same race means a command that reads its terminal size at once may see 0x0; a
    shell gets the size a moment later with SIGWINCH.)
    """
    if not tty or kind != stream.STDERR:
        return data
    return b"".join(ln for ln in data.splitlines(keepends=True) if b"cannot resize a stopped container" not in ln)


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Session:
    def __init__(self, spec: Spec, command: Sequence[str], tty: bool, rows: int = 24, cols: int = 80) -> None:
        self.spec = spec
        self.exec_id = f"kiln-exec-{secrets.token_hex(6)}"
        self.tty = tty
        self.argv = ctr.exec_argv(spec, self.exec_id, command, tty)
        self.rows, self.cols = rows, cols
        self.master = -1  # the pty ctr runs on (TTY sessions)

    def _spawn(self) -> tuple[subprocess.Popen[bytes], int, dict[int, bytes]]:
        """Start ctr; returns it, the fd its input goes to, and its output fds → frame type."""
        if self.tty:
            master, slave = os.openpty()
            set_size(master, self.rows, self.cols)
            # setsid --ctty: ctr leads a new session with the pty as controlling terminal, so a
            # size change reaches it as SIGWINCH.
            # ctr's own messages go to a pipe: the process's output all comes through the pty.
            proc = subprocess.Popen(["/usr/bin/setsid", "--ctty", *self.argv],
                                    stdin=slave, stdout=slave, stderr=subprocess.PIPE, close_fds=True)
            os.close(slave)
            os.set_blocking(master, False)
            self.master = master
            assert proc.stderr is not None
            return proc, master, {master: stream.STDOUT, proc.stderr.fileno(): stream.STDERR}
        proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        assert proc.stdin and proc.stdout and proc.stderr
        os.set_blocking(proc.stdin.fileno(), False)
        return proc, proc.stdin.fileno(), {proc.stdout.fileno(): stream.STDOUT,
                                           proc.stderr.fileno(): stream.STDERR}

    def serve(self, conn: socket.socket) -> int:
        """Run the session on an upgraded connection; returns the process's exit status."""
        proc, in_fd, outputs = self._spawn()
        box = stream.Outbox(conn)
        frames = stream.Frames()
        pending = bytearray()  # client input the process has not taken yet
        client_open, eof_wanted = True, False
        try:
            while outputs:
                sources = [] if box.full else list(outputs)
                writable = [in_fd] if pending and in_fd >= 0 else []
                if box.buf:
                    writable.append(conn.fileno())
                sock_ready, ready, can_write = stream.wait(
                    conn, client_open and len(pending) < HIGH_WATER, sources, writable, 1.0)
                if conn.fileno() in can_write:
                    box.flush()
                if sock_ready:
                    data = box.recv()
                    if data == b"":  # the client went away: the process must not live on unseen
                        client_open = False
                        box.buf.clear()
                        self._kill()
                    for kind, payload in frames.feed(data or b""):
                        eof_wanted |= self._handle(kind, payload, in_fd, pending)
                for fd in ready:
                    try:
                        data = os.read(fd, stream.CHUNK)
                    except OSError:  # EIO: the pty's other side closed (ctr exited)
                        data = b""
                    if not data:
                        del outputs[fd]
                    elif client_open and (data := _without_late_resize(data, self.tty, outputs[fd])):
                        box.put(stream.frame(outputs[fd], data))
                if in_fd in can_write and pending:
                    try:
                        del pending[:os.write(in_fd, bytes(pending[:stream.CHUNK]))]
                    except BlockingIOError:
                        pass
                    except OSError:  # the process no longer reads its input: drop the rest
                        pending.clear()
                        in_fd = self._close_input(proc, in_fd)
                if eof_wanted and not pending and in_fd >= 0:
                    in_fd = self._close_input(proc, in_fd)
            code = proc.wait()
            if client_open:
                box.put(stream.exit_status(code))
                box.drain(SEND_TIMEOUT)
            return code
        except (OSError, stream.ProtocolError) as e:
            self._kill()
            with contextlib.suppress(OSError):
                box.put(stream.frame(stream.ERROR, str(e).encode()))
                box.drain(5)
            return -1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if self.master >= 0:
                os.close(self.master)

    def _handle(self, kind: bytes, payload: bytes, in_fd: int, pending: bytearray) -> bool:
        """One client frame; returns True when the client has no more input."""
        if kind == stream.STDIN:
            if in_fd >= 0:
                pending += payload
        elif kind == stream.STDIN_EOF:
            return True
        elif kind == stream.RESIZE and self.tty:
            self.rows, self.cols = stream.unpack_pair(payload)
            set_size(self.master, self.rows, self.cols)
        elif kind == stream.SIGNAL:
            sig = stream.unpack_int(payload)
            if sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGKILL):
                ctr.kill(self.spec.runtime, self.spec.id, str(sig), self.exec_id, timeout=30)
        return False

    def _close_input(self, proc: subprocess.Popen[bytes], in_fd: int) -> int:
        if self.tty:  # a terminal has no EOF of its own: the line discipline's ^D is one
            with contextlib.suppress(OSError):
                os.write(in_fd, b"\x04")
            return -1
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        return -1

    def _kill(self) -> None:
        ctr.kill(self.spec.runtime, self.spec.id, "SIGKILL", self.exec_id, timeout=30)
