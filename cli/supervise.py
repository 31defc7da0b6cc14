"""Process supervision, written once: a throw-away redis-server, and `manage.py` children (API, worker, batch driver,
Flower) in their own sessions, with their output in a log file or on the terminal, stopped as a group.

Used by `manage.py up` (cli/processes.py), the tests (tests/support.py adds their credentials) and the
benchmarks (bench/), which therefore never import from tests/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from config.values import REPO_ROOT

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """The predicate's first truthy value; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if not binary:
        raise RuntimeError("redis-server is not installed; scripts/test.sh installs it (apt-get install redis-server)")
    return binary


class RedisUnavailable(RuntimeError):
    pass


def redis_answers(url: str, **ssl: str) -> bool:
    from tasks.redis_client import make_redis

    try:
        return bool(make_redis(url, **ssl).ping())
    except Exception:
        return False


def _install_redis_server() -> str | None:
    """Install Debian's redis-server where we may (root with apt-get); None otherwise."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=False, env=env)
    return shutil.which("redis-server")


def ensure_redis(url: str, data_dir: Path, **ssl: str) -> RedisServer | None:
    """None if the Redis at `url` answers; else a redis-server started for it (only a local, plain redis://
    one: a TLS or remote Redis that does not answer is an error to report, not something to start)."""
    if redis_answers(url, **ssl):
        return None
    parsed = urlparse(url)
    if parsed.scheme == "rediss":
        raise RedisUnavailable(
            f"Redis at {url} does not answer over TLS (check AETHERCORE_REDIS_CA/CERT/KEY); "
            "a TLS Redis is never started here"
        )
    if parsed.scheme != "redis" or (parsed.hostname or "") not in LOCAL_HOSTS:
        raise RedisUnavailable(f"Redis at {url} does not answer, and it is not local, so it cannot be started here")
    if not shutil.which("redis-server") and not _install_redis_server():
        raise RedisUnavailable(
            f"Redis at {url} does not answer and redis-server is not installed; "
            "install it (apt-get install redis-server) or set AETHERCORE_REDIS_URL"
        )
    try:
        return RedisServer(parsed.port or 6379, data_dir=data_dir, databases=16).start()
    except (RuntimeError, AssertionError) as exc:
        raise RedisUnavailable(str(exc)) from None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class RedisServer:
    """A redis-server on a port of its own (a spare one by default), its data in a temporary directory unless
    given one; `appendonly` for persistence."""

    def __init__(
        self,
        port: int | None = None,
        appendonly: bool = False,
        data_dir: Path | None = None,
        databases: int = 32,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = redis_server_binary()
        self.extra_args = extra_args
        self.port = port or free_port()
        self.temporary = data_dir is None
        self.dir = data_dir or Path(tempfile.mkdtemp(prefix="aethercore-redis-"))
        self.appendonly = appendonly
        self.databases = databases
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout_s: float = 10) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--databases",
            str(self.databases),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )  # Ctrl-C on the terminal reaches its parent only
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode} (is port {self.port} taken?)")
            return _pings(client)

        wait_until(answers, timeout_s, what=f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def cleanup(self) -> None:
        self.stop()
        if self.temporary:
            shutil.rmtree(self.dir, ignore_errors=True)


def wait_replicas_online(port: int, count: int, timeout_s: float = 30) -> None:
    """Until the primary on `port` has `count` replicas past their first sync (WAIT counts only those, and
    min-replicas-to-write lets it write only with them)."""

    def online() -> bool:
        try:
            info = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=1).info("replication")
        except (redis.RedisError, OSError):
            return False
        states = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return sum(state.get("state") == "online" for state in states) >= count

    wait_until(online, timeout_s, 0.1, f"{count} replica(s) of the primary on port {port}")


class SentinelGroup:
    """A primary, `replicas` replicas and `sentinels` sentinels (Debian's redis-server, `--sentinel` mode) on spare
    loopback ports, for the failover test and storm: `url` is the `sentinel://` URL of all the sentinels."""

    def __init__(
        self,
        replicas: int = 2,
        sentinels: int = 3,
        master_name: str = "aether",
        down_after_ms: int = 3000,
        min_replicas_to_write: int = 0,
        appendonly: bool = False,
    ) -> None:
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.quorum = sentinels // 2 + 1
        self.dir = Path(tempfile.mkdtemp(prefix="aethercore-sentinel-"))
        # min-replicas-to-write on every data node (each may be promoted): a primary cut off from its replicas
        # (one frozen and resumed, isolated from the sentinels) stops accepting writes after min-replicas-max-lag.
        self.node_args: tuple[str, ...] = ("--repl-diskless-sync-delay", "0") + (
            ("--min-replicas-to-write", str(min_replicas_to_write), "--min-replicas-max-lag", "5")
            if min_replicas_to_write
            else ()
        )
        self.appendonly = appendonly
        self.nodes: dict[int, RedisServer] = {}
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_procs: list[subprocess.Popen] = []
        self.replica_count = replicas
        self.promoted_at = 0.0
        self.signalled_at = 0.0  # when kill_primary / pause_primary sent its signal (time.monotonic())

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports) + "/0"

    def _node(self, port: int | None = None, replica_of: int | None = None) -> RedisServer:
        args = self.node_args + (("--replicaof", "127.0.0.1", str(replica_of)) if replica_of else ())
        port = port or free_port()
        node = RedisServer(port, appendonly=self.appendonly, data_dir=self.dir / f"node-{port}", extra_args=args)
        self.nodes[port] = node.start()
        return node

    def start(self, timeout_s: float = 30) -> SentinelGroup:
        primary = self._node()
        for _ in range(self.replica_count):
            self._node(replica_of=primary.port)
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {primary.port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master_name} {max(10000, 3 * self.down_after_ms)}\n"
                f"sentinel parallel-syncs {self.master_name} 2\n"
            )
            self.sentinel_procs.append(
                subprocess.Popen(
                    [redis_server_binary(), str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        wait_until(lambda: self._all_sentinels_see(self.replica_count), timeout_s, 0.2, "the sentinels")
        wait_replicas_online(primary.port, self.replica_count, timeout_s)
        return self

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=1, decode_responses=True)

    def _all_sentinels_see(self, replicas: int) -> bool:
        try:
            for port in self.sentinel_ports:
                state = self._sentinel(port).sentinel_master(self.master_name)
                if (
                    int(state.get("num-slaves", 0)) < replicas
                    or int(state.get("num-other-sentinels", 0)) < len(self.sentinel_ports) - 1
                ):
                    return False
            return True
        except (redis.RedisError, OSError):
            return False

    def master_port(self) -> int | None:
        """The primary's port as a majority of the sentinels name it (None while they disagree or cannot)."""
        named: dict[int, int] = {}
        for port in self.sentinel_ports:
            try:
                _, master = self._sentinel(port).sentinel_get_master_addr_by_name(self.master_name)
                named[int(master)] = named.get(int(master), 0) + 1
            except (redis.RedisError, OSError, TypeError):
                continue
        best = max(named.items(), key=lambda item: item[1], default=None)
        return best[0] if best and best[1] >= self.quorum else None

    def role(self, port: int) -> str | None:
        try:
            return str(redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=1).role()[0].decode())
        except (redis.RedisError, OSError):
            return None

    def kill_primary(self, timeout_s: float = 60) -> tuple[int, int]:
        """SIGKILL the current primary, wait until a replica is promoted and restart the killed node as a replica
        of it; (old port, new port)."""
        old = self.master_port()
        assert old is not None, "no primary to kill"
        node = self.nodes[old]
        assert node.proc is not None
        self.signalled_at = time.monotonic()
        node.proc.kill()
        node.proc.wait(10)
        new = self.wait_promoted(old, timeout_s)
        self.nodes.pop(old)
        self._node(old, replica_of=new)
        wait_replicas_online(new, self.replica_count, timeout_s)
        return old, new

    def wait_promoted(self, old: int, timeout_s: float = 60) -> int:
        """The new primary's port, once a majority of the sentinels name it and it says it is one (the moment is
        kept in `promoted_at`, time.monotonic())."""
        new = wait_until(
            lambda: (p := self.master_port()) not in (None, old) and self.role(p) == "master" and p,
            timeout_s,
            0.05,
            "a replica's promotion",
        )
        self.promoted_at = time.monotonic()
        return new

    def pause_primary(self, timeout_s: float = 60) -> tuple[int, int]:
        """SIGSTOP the primary until the sentinels promote a replica (past their down-after), resume it and wait
        until it is a replica of the new one, not a second primary; (old port, new port)."""
        old = self.master_port()
        assert old is not None, "no primary to pause"
        proc = self.nodes[old].proc
        assert proc is not None
        self.signalled_at = time.monotonic()
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            new = self.wait_promoted(old, timeout_s)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        wait_until(lambda: self.role(old) == "slave", timeout_s, 0.2, "the resumed primary to become a replica")
        wait_replicas_online(new, self.replica_count, timeout_s)
        return old, new

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        for node in self.nodes.values():
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Child:
    """A `manage.py` child in its own session (so a signal reaches it and its model processes together), its
    output in `log_dir/<name>-....log` or, without a log_dir, on this terminal."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path | None = None) -> None:
        self.label = name
        self.env = env
        self.log_path = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = log_dir / f"{name}-{os.getpid()}-{int(time.time() * 1000)}.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def spawn(self, *args: str) -> Child:
        output: Any = None
        if self.log_path is not None:
            output = self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "manage.py"), *args],
            env=self.env,
            cwd=REPO_ROOT,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,
        )
        return self

    def died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole group (the child and its model processes) and wait for the child."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)

    def terminate(self) -> None:
        """SIGTERM to the group without waiting (see stop_all)."""
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 20) -> None:
        stop_all([self], timeout_s)


def stop_all(children: list[Child], timeout_s: float = 20) -> None:
    """SIGTERM every child's group (last started first), wait up to `timeout_s` in all, then SIGKILL."""
    for child in reversed(children):
        child.terminate()
    deadline = time.monotonic() + timeout_s
    for child in reversed(children):
        if child.proc is None:
            continue
        try:
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(child.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.proc.wait(10)
        if child._log is not None:
            child._log.close()


class Worker(Child):
    """`manage.py worker --device D`; `start()` waits for its first heartbeat."""

    def __init__(
        self,
        redis_url: str,
        env: dict[str, str],
        name: str = "worker",
        device: str = "cpu",
        log_dir: Path | None = None,
    ) -> None:
        super().__init__(name, env, log_dir)
        self.redis_url = redis_url
        self.device = device

    def start(self, wait: bool = True) -> Worker:
        self.spawn("worker", "--device", self.device)
        if wait:
            wait_until(lambda: self.record() is not None or self.died(), 90, 0.2, "the worker's heartbeat")
            if self.died():
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
        return self

    @property
    def name(self) -> str:
        """Its Celery node name (the name in heartbeats, Flower and job records)."""
        return f"{self.device.replace(':', '')}.{self.proc.pid}@{socket.gethostname()}"

    def record(self) -> dict[str, Any] | None:
        from config.settings import Settings
        from tasks.names import worker_key
        from tasks.redis_client import make_redis

        ssl = Settings.from_env(self.env).redis_ssl(self.redis_url)  # rediss:// with the worker's own CA and cert
        client = make_redis(self.redis_url, self.env.get("AETHERCORE_REDIS_SENTINEL_MASTER", "mymaster"), **ssl)
        raw = client.get(worker_key(self.name))
        return json.loads(raw) if raw else None


class BatchDriver(Child):
    """`manage.py batches` (batches/driver.py) with `env`'s settings; `start()` waits for its first heartbeat."""

    def __init__(self, env: dict[str, str], name: str = "batches", log_dir: Path | None = None) -> None:
        super().__init__(name, env, log_dir)

    def start(self, timeout_s: float = 60) -> BatchDriver:
        self.spawn("batches")
        wait_until(lambda: self.alive() or self.died(), timeout_s, 0.1, "the batch driver's heartbeat")
        if self.died():
            raise RuntimeError(f"batch driver exited with {self.proc.returncode}:\n{self.log()}")
        return self

    @property
    def name(self) -> str:
        """Its name in the drivers' heartbeats (batches/driver.py)."""
        return f"batches.{self.proc.pid}@{socket.gethostname()}"

    def alive(self) -> bool:
        from config.settings import Settings
        from tasks.names import BATCH_DRIVERS
        from tasks.redis_client import make_redis

        settings = Settings.from_env(self.env)
        client = make_redis(settings.redis_url, settings.redis_sentinel_master, **settings.redis_options())
        return client.zscore(BATCH_DRIVERS, self.name) is not None


class Api(Child):
    """`manage.py api` on a spare port (or `port`); `start()` waits until it answers."""

    def __init__(
        self,
        env: dict[str, str],
        name: str = "api",
        ca: str | None = None,
        log_dir: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        tls = bool(env.get("AETHERCORE_TLS_CERT"))
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify: str | bool = ca or True  # the CA a TLS API's certificate is checked against
        super().__init__(name, {**env, "AETHERCORE_PORT": str(self.port), "AETHERCORE_HOST": "127.0.0.1"}, log_dir)

    def start(self, timeout_s: float = 60) -> Api:
        import requests

        self.spawn("api")

        def up() -> bool:
            if self.died():
                raise RuntimeError(f"API exited:\n{self.log()}")
            try:
                return requests.get(f"{self.base}/heartbeat", timeout=1, verify=self.verify).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, timeout_s, 0.2, "the API to answer")
        return self
