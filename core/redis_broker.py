"""The Redis broker: pushes, evictions and node liveness shared by several core nodes over pub/sub."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import eager
from .broker import Delivery, LocalDeliver, Target
from .config import BrokerSettings
from .metrics import Metrics

log = logging.getLogger("fleetpush.broker")

# Called with (kind, data) for control messages from other nodes, e.g. ("evict", {"sn": ...}).
ControlHandler = Callable[[str, dict[str, Any]], Awaitable[None]]
# Called once with the id of a node that stopped heartbeating; this node took over its clean-up.
NodeLostHandler = Callable[[str], Awaitable[None]]
# Called after the link to Redis came back, so work that could not cross nodes is redone.
ReconnectHandler = Callable[[], Awaitable[None]]

_REPLY_WAIT_S = 0.5
_POOL_SIZE = 32


class _Tally:
    """Delivery counts other nodes reported for one push of this node's, until all are in."""

    __slots__ = ("done", "expected", "got")

    def __init__(self) -> None:
        self.expected = -1  # unknown until PUBLISH says how many nodes heard the push
        self.got: list[Delivery] = []
        self.done = asyncio.get_running_loop().create_future()

    def add(self, d: Delivery) -> None:
        self.got.append(d)
        self._check()

    def expect(self, n: int) -> None:
        self.expected = n
        self._check()

    def _check(self) -> None:
        if 0 <= self.expected <= len(self.got) and not self.done.done():
            self.done.set_result(None)


class RedisBroker:
    """Delivers locally at once, then publishes to the other nodes and (when asked) sums their counts."""

    def __init__(self, settings: BrokerSettings, node_id: str, metrics: Metrics) -> None:
        self.settings = settings
        self.node_id = node_id
        self.metrics = metrics
        p = settings.channel_prefix
        self.channel = f"{p}:bus"
        self._nodes_key = f"{p}:nodes"
        self._alive_prefix = f"{p}:alive:"
        # Each node hears other nodes' delivery counts for its own pushes on its own reply channel,
        # on the subscription it already holds: no pooled connection sits in a BLPOP per push.
        self._reply_channel = f"{p}:reply:{node_id}"
        self._reply_prefix = f"{p}:reply:"
        self._tallies: dict[str, _Tally] = {}
        # A bounded pool that makes a burst wait for a free connection (up to 2 s) instead of failing
        # with MaxConnectionsError: 300 devices dropping at once publish 300 presence pushes together.
        # A pooled connection from before a Redis restart fails on first use; one quick retry on a
        # fresh connection turns that into success instead of a spurious drop.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=_POOL_SIZE,
            timeout=2.0,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._redis = aioredis.Redis.from_pool(pool)
        self._deliver: LocalDeliver | None = None
        self._control: ControlHandler | None = None
        self._node_lost: NodeLostHandler | None = None
        self._reconnected: ReconnectHandler | None = None
        self._was_connected = False
        # True while the listener holds a live subscription; a failed publish or heartbeat marks the
        # broker degraded, and the next heartbeat that succeeds while subscribed clears it again
        # (otherwise one timeout under load would silence cross-node pushes until a restart).
        self._subscribed = False
        self._tasks: list[asyncio.Task[None]] = []
        self.degraded = True
        self.connected = asyncio.Event()
        self._stopping = False

    # ---------------------------------------------------------------- wiring

    def bind(self, deliver: LocalDeliver) -> None:
        """Set the function that delivers to this node's connections."""
        self._deliver = deliver

    def bind_control(
        self, control: ControlHandler, node_lost: NodeLostHandler, reconnected: ReconnectHandler
    ) -> None:
        """Set the handlers for other nodes' control messages, lost nodes, and a restored link."""
        self._control = control
        self._node_lost = node_lost
        self._reconnected = reconnected

    def _set_degraded(self, value: bool) -> None:
        if value != self.degraded:
            log.warning("broker %s", "degraded: Redis unreachable" if value else "connected to Redis")
        self.degraded = value
        self.metrics.broker_degraded.set(1 if value else 0)
        if value:
            self.connected.clear()
        else:
            self.connected.set()

    async def start(self) -> None:
        """Subscribe and start heartbeating; a Redis that is down is retried in the background."""
        self.metrics.broker_degraded.set(1)
        self._tasks.append(asyncio.create_task(self._listen()))
        self._tasks.append(asyncio.create_task(self._heartbeat()))

    async def stop(self) -> None:
        """Leave the cluster: stop listening, drop the node's liveness key."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(2):
                await self._redis.delete(self._alive_prefix + self.node_id)
                await self._redis.srem(self._nodes_key, self.node_id)
        except (RedisError, OSError, TimeoutError):
            pass
        closer: Any = self._redis.aclose
        await closer()

    # ---------------------------------------------------------------- publishing

    async def publish(self, target: Target, service: str, frame: bytes, counts: bool = True) -> Delivery:
        """Deliver here, publish to the other nodes, and add up what they report."""
        result = self._deliver(target, service, frame) if self._deliver else Delivery()
        if self.degraded:
            self.metrics.broker_dropped.inc()
            return result
        await eager.in_task()  # redis-py arms asyncio.timeout per command: it needs a task
        push_id = uuid.uuid4().hex
        header = {"k": "push", "o": self.node_id, "id": push_id, "t": target.to_json(), "s": service, "r": counts}
        # Registered before publishing: a fast node's count can arrive before PUBLISH returns here.
        tally = _Tally() if counts else None
        if tally is not None:
            self._tallies[push_id] = tally
        try:
            receivers = int(await self._redis.publish(self.channel, _pack(header, frame)))
            if tally is not None:
                tally.expect(receivers - 1)  # every node, this one included, listens on the bus
                try:
                    async with eager.timeout(_REPLY_WAIT_S):
                        await tally.done
                except TimeoutError:
                    log.debug("cross-node counts for %s incomplete: %d of %d", push_id, len(tally.got),
                              tally.expected)
                for reply in tally.got:
                    result.add(reply)
        except (RedisError, OSError) as exc:
            self.metrics.broker_dropped.inc()
            log.warning("cross-node push %s not published: %s", service, type(exc).__name__)
            self._set_degraded(True)
        finally:
            if tally is not None:
                self._tallies.pop(push_id, None)
        return result

    async def send_control(self, kind: str, data: dict[str, Any]) -> bool:
        """Tell every other node something (e.g. evict a device that logged in here); False if not sent."""
        if self.degraded:
            self.metrics.broker_dropped.inc()
            return False
        await eager.in_task()
        try:
            await self._redis.publish(self.channel, _pack({"k": kind, "o": self.node_id, "d": data}, b""))
            return True
        except (RedisError, OSError):
            self.metrics.broker_dropped.inc()
            self._set_degraded(True)
            return False

    # ---------------------------------------------------------------- receiving

    async def _listen(self) -> None:
        delay = 0.2
        while not self._stopping:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel, self._reply_channel)
                self._subscribed = True
                self._set_degraded(False)
                delay = 0.2
                if self._was_connected and self._reconnected is not None:
                    self._spawn(self._reconnected)
                self._was_connected = True
                while not self._stopping:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    if msg.get("channel") == self._reply_channel.encode():
                        self._on_counts(msg["data"])
                    else:
                        await self._handle(msg["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.debug("broker listener lost Redis: %s", exc)
                self._subscribed = False
                self._set_degraded(True)
                await asyncio.sleep(delay)  # reconnect backoff
                delay = min(delay * 2, 5.0)
            except Exception:
                log.exception("broker listener failed; restarting it")
                await asyncio.sleep(delay)
            finally:
                self._subscribed = False
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                except (RedisError, OSError):
                    pass

    def _spawn(self, fn: ReconnectHandler) -> None:
        async def run() -> None:
            try:
                await fn()
            except Exception:
                log.exception("reconnect handler failed")

        task = asyncio.create_task(run())
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _handle(self, raw: bytes) -> None:
        header, frame = _unpack(raw)
        if header.get("o") == self.node_id:
            return
        kind = header.get("k")
        if kind == "push":
            if self._deliver is None:
                return
            res = self._deliver(Target.from_json(header["t"]), header["s"], frame)
            if not header.get("r"):
                return
            counts = json.dumps({"id": header["id"], "m": res.matched, "q": res.queued, "n": self.node_id})
            try:
                await self._redis.publish(self._reply_prefix + str(header.get("o")), counts)
            except (RedisError, OSError):
                pass  # the origin then reports what it could count: it never waits past _REPLY_WAIT_S
        elif self._control is not None and isinstance(kind, str):
            try:
                await self._control(kind, header.get("d") or {})
            except Exception:
                log.exception("control message %s failed", kind)

    def _on_counts(self, raw: bytes) -> None:
        try:
            data = json.loads(raw)
            tally = self._tallies.get(str(data["id"]))
            if tally is not None:  # else the push already gave up waiting
                tally.add(Delivery(int(data["m"]), int(data["q"])))
        except (ValueError, KeyError, TypeError):
            log.warning("malformed cross-node counts ignored")

    # ---------------------------------------------------------------- node liveness

    async def _heartbeat(self) -> None:
        # Each node refreshes a key that expires after node_timeout_s; every node also looks for
        # members whose key is gone, and exactly one (by SET NX) cleans up after each lost node.
        period = max(0.1, self.settings.node_timeout_s / 3)
        ttl_ms = int(self.settings.node_timeout_s * 1000)
        while not self._stopping:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.set(self._alive_prefix + self.node_id, str(time.time()), px=ttl_ms)
                    pipe.sadd(self._nodes_key, self.node_id)
                    await pipe.execute()
                if self._subscribed:
                    self._set_degraded(False)
                for member in await self._redis.smembers(self._nodes_key):
                    node = member.decode() if isinstance(member, bytes) else str(member)
                    if node == self.node_id or await self._redis.exists(self._alive_prefix + node):
                        continue
                    if await self._redis.set(f"{self.settings.channel_prefix}:reap:{node}", self.node_id,
                                             nx=True, px=ttl_ms):
                        log.warning("node %s stopped heartbeating; taking over its devices", node)
                        await self._redis.srem(self._nodes_key, node)
                        if self._node_lost is not None:
                            await self._node_lost(node)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.debug("heartbeat failed: %s", exc)
                self._set_degraded(True)
            except Exception:
                log.exception("node liveness check failed")
            await asyncio.sleep(period)


def _pack(header: dict[str, Any], frame: bytes) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + frame


def _unpack(raw: bytes) -> tuple[dict[str, Any], bytes]:
    head, _, frame = raw.partition(b"\n")
    return json.loads(head), frame
