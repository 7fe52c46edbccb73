"""A policy service that does not care how bytes arrive: what `pi0 serve` and each Ray Serve replica share.

One `Service` per process: the policy, the limits, one queue of prepared requests answered by a model thread in
dynamic batches, a pool of (lower-priority) threads that decode and validate requests, the in-flight budget,
metrics, and the per-connection session: metadata first, then request -> reply, with the connection's conduct
(bad requests in a row are held back, then cut off). A transport (websockets in `pi0.serving.server`,
Starlette under Ray in `pi0.serving.ray_serve`) hands it a `Link` per connection and does nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pi0.serving import msgpack_numpy
from pi0.serving.limits import Budget, Conduct, Limits
from pi0.serving.metrics import ServerMetrics
from pi0.serving.requests import (
    InferPolicy,
    decode_and_prepare,
    encode_reply,
    failed_request,
    merge,
    record,
    refusal,
    run_rows,
)

log = logging.getLogger("pi0.serve")
PREPARE_NICE = 10  # the request-preparing threads' nice value: below the model's forward


@dataclass
class Job:
    """Prepared rows waiting for the model, and where their answer goes."""

    rows: list[Any]
    explicit_batch: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # its connection went away: never computed


def lower_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: threads have their own nice value), so that request decoding
    and validation take the cores only when the model's forward leaves them idle."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREPARE_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: the threads run at the process's priority
        pass


class Gone(Exception):
    """The client closed the connection (or it broke)."""


class Link(Protocol):
    """One client connection as a transport gives it to `Service.session`."""

    peer: str
    closed: asyncio.Future  # done once the client is gone

    async def recv(self) -> bytes | str: ...  # the next message; raises Gone

    async def send(self, data: bytes | str) -> None: ...  # raises Gone

    async def close(self, code: int, reason: str) -> None: ...


class Service:
    """The policy behind any transport: admission (connection limit, in-flight budget), decoding and validation
    off the event loop in lower-priority threads, dynamic batching on one model thread, errors, metrics, and each
    connection's session. `start()` before the first session, `stop()` at the end."""

    def __init__(self, policy: InferPolicy, limits: Limits, name: str | None = None, prepare_threads: int = 2,
                 recorder: Any = None):
        """recorder: a `pi0.data.recorder.ObservationRecorder` that gets every answered request's observation and
        chunk (one episode per connection, or up to a request whose observation says "episode_done")."""
        self.policy, self.limits, self.name = policy, limits, name  # name: server_timing.replica when set
        self.recorder = recorder
        self._record_lock = threading.Lock()
        self.budget = Budget(limits.inflight_bytes)
        self.metrics = ServerMetrics(name)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.decoder = ThreadPoolExecutor(max_workers=max(1, prepare_threads), thread_name_prefix="pi0-prepare",
                                          initializer=lower_priority)
        self.worker = threading.Thread(target=self._work, name="pi0-infer", daemon=True)
        self.connections = 0

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=60)
        self.decoder.shutdown(wait=self.recorder is not None)  # recording: what was answered is written
        if self.recorder is not None:
            counts = self.recorder.close()
            log.info("recorded %s episodes into %s (%s requests of another shape not recorded)",
                     counts.get("episodes"), counts.get("root"), counts.get("mismatched"))

    def _record(self, key: Any, observations: list[Any], results: list[Any], end: bool = False) -> None:
        """The answered rows of one request into the recording (on a preparing thread, after the reply went out)."""
        try:
            with self._record_lock:
                for obs, result in zip(observations, results):
                    if isinstance(result, dict) and isinstance(obs, dict):
                        chunk = np.asarray(result["actions"])
                        timing = result.get("policy_timing", {})
                        self.recorder.add(obs, chunk[0], chunk=chunk, latency_s=timing.get("infer_ms", 0.0) / 1000.0,
                                          key=key)
                        if obs.get("episode_done"):
                            self.recorder.end_episode(bool(obs.get("episode_success", False)), key)
                if end:
                    self.recorder.end_episode(None, key)
        except Exception as e:  # noqa: BLE001 - recording never costs a robot its answer
            log.error("recording failed for a request: %s", e)

    # -- admission --------------------------------------------------------------------------------

    def cannot_admit(self) -> str | None:
        """Why a new connection cannot be served now (counted), or None: checked at the handshake."""
        if self.connections >= self.limits.max_connections:
            self.metrics.refused("limit")
            return f"at its connection limit ({self.limits.max_connections}; pi0 serve --max-connections)"
        if self.budget.used + self.limits.reserved > self.budget.limit:
            self.metrics.refused("budget")
            return (f"the memory budget is full ({self.budget.limit >> 20} MiB; pi0 serve --max-inflight-mb): "
                    "try again later")
        return None

    async def session(self, link: Link) -> None:
        """One connection from start to end: its reservation, the metadata frame, then requests one at a time."""
        if not self.budget.take(self.limits.reserved):  # all it can make the server hold: never waits on others
            log.warning("connection from %s refused: the in-flight budget is full", link.peer)
            self.metrics.refused("budget")
            await link.close(1013, f"the memory budget is full ({self.budget.limit >> 20} MiB; pi0 serve "
                                   "--max-inflight-mb): try again later")
            return
        self.connections += 1
        self.metrics.set_connections(self.connections)
        self.metrics.set_inflight(self.budget.used)
        log.info("connection from %s (%d open)", link.peer, self.connections)
        try:
            await link.send(msgpack_numpy.packb(self.policy.metadata))
            await self._requests(link)
        except Gone:
            pass
        finally:
            if self.recorder is not None:  # the connection's episode ends with it
                self.decoder.submit(self._record, id(link), [], [], True)
            self.connections -= 1
            self.budget.give(self.limits.reserved)
            self.metrics.set_connections(self.connections)
            self.metrics.set_inflight(self.budget.used)
            log.info("connection from %s closed", link.peer)

    async def _requests(self, link: Link) -> None:
        loop = asyncio.get_running_loop()
        prev_total_ms: float | None = None
        conduct = Conduct(self.limits.max_errors)
        while True:
            message = await link.recv()
            t0 = time.perf_counter()
            if len(message) > self.limits.max_message_bytes:  # a transport that buffers whole messages
                await link.close(1009, f"message of {len(message)} bytes over the limit of "
                                       f"{self.limits.max_message_bytes} (pi0 serve --max-message-mb)")
                return
            answer = await self.answer(loop, message, link.closed, prev_total_ms)  # within the reservation
            if answer is None:  # the client went away: its request is dropped
                return
            reply, rows, observations = answer
            await link.send(reply)
            if self.recorder is not None and rows:
                self.decoder.submit(self._record, id(link), observations, rows)
            prev_total_ms = (time.perf_counter() - t0) * 1000.0
            wait = conduct.answered(failed_request(reply, rows))
            if conduct.exhausted:
                log.warning("closing the connection from %s: %d bad requests in a row", link.peer, conduct.in_row)
                self.metrics.refused("errors")
                await link.close(1008, f"{conduct.in_row} bad requests in a row: fix the request (the replies said "
                                       "what was wrong), then reconnect")
                return
            if wait:  # held back: nothing more is read from this client meanwhile
                self.metrics.held_back(wait)
                await asyncio.wait({link.closed}, timeout=wait)

    async def answer(self, loop: asyncio.AbstractEventLoop, message: bytes | str, closed: asyncio.Future,
                     prev_total_ms: float | None) -> tuple[bytes | str, list[Any] | None, list[Any]] | None:
        """(the reply, each row's result or exception (None for a message that was no request), the rows'
        observations), or None when the client left before its answer."""
        try:
            rows, explicit, observations = await loop.run_in_executor(self.decoder, decode_and_prepare, self.policy, message,
                                                        self.limits.max_message_bytes, self.limits.max_batch,
                                                        self.metrics)
        except Exception as e:  # noqa: BLE001 - a bad request, or a bug of ours (an id for the client)
            return refusal(e, self.metrics), None, []
        good = [r for r in rows if not isinstance(r, Exception)]
        results: list[Any] = list(rows)
        timing: dict[str, Any] = {"infer_ms": 0.0, "queue_ms": 0.0, "batch_size": 0}
        if good:
            job = Job(good, explicit, loop, loop.create_future())
            self.jobs.put(job)
            done, _ = await asyncio.wait({job.future, closed}, return_when=asyncio.FIRST_COMPLETED)
            if job.future not in done:
                job.cancelled = True
                return None
            answers, timing = job.future.result()
            results = merge(rows, answers)
        record(results, self.metrics)
        t = time.perf_counter()
        reply = encode_reply(results, timing, explicit, prev_total_ms)
        self.metrics.observe("postprocess", time.perf_counter() - t)
        return reply, results, observations

    # -- the model thread -------------------------------------------------------------------------

    def _take_batch(self) -> list[Job] | None:
        """The next job, plus up to max_batch - 1 single requests that arrive within batch_wait."""
        first = self.jobs.get()
        if first is None:
            return None
        batch = [first]
        if first.explicit_batch:
            return batch
        deadline = time.perf_counter() + self.limits.batch_wait_ms / 1000.0
        # each connection has at most one request in flight: once every open connection is in the batch,
        # nobody else can join it, so there is nothing to wait for (a lone robot never waits)
        while len(batch) < min(self.limits.max_batch, self.connections):
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)
                break
            if job.explicit_batch:  # it runs on its own, next
                self.jobs.put(job)
                break
            batch.append(job)
        return batch

    def _work(self) -> None:
        while (batch := self._take_batch()) is not None:
            dropped = [j for j in batch if j.cancelled]
            self.metrics.count("dropped", sum(len(j.rows) for j in dropped))
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            started = time.perf_counter()
            rows = [r for j in batch for r in j.rows]
            results = run_rows(self.policy, rows)
            infer_ms = (time.perf_counter() - started) * 1000.0
            self.metrics.batch(len(rows))
            at = 0
            for job in batch:
                part = results[at: at + len(job.rows)]
                at += len(job.rows)
                self.metrics.observe("queue", started - job.enqueued)
                timing = {"infer_ms": infer_ms, "queue_ms": (started - job.enqueued) * 1000.0, "batch_size": len(rows)}
                if self.name is not None:
                    timing["replica"] = self.name
                job.loop.call_soon_threadsafe(_finish, job, part, timing)


def _finish(job: Job, rows: list[Any], timing: dict[str, Any]) -> None:
    if not job.future.done():
        job.future.set_result((rows, timing))


