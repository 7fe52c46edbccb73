"""A request's life outside the model: decoded, split into rows, prepared (checked) off the model's thread, answered,
encoded; errors as the client sees them."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Protocol

from pi0.errors import BadRequest, NoActions
from pi0.serving import msgpack_numpy
from pi0.serving.metrics import ServerMetrics
from pi0.serving.msgpack_numpy import BadMessage

log = logging.getLogger("pi0.serve")


class InferPolicy(Protocol):
    metadata: dict[str, Any]

    def prepare_request(self, obs: dict[str, Any]) -> Any: ...  # raises BadRequest

    def run_prepared(self, rows: list[Any]) -> list[dict[str, Any]]: ...

    def warmup(self, batches: tuple[int, ...] = (1,)) -> float: ...  # every batch size it will be asked


class InternalError(Exception):
    """A failure that is not the client's: logged once with its traceback under `error_id`; the client gets
    the id only."""

    def __init__(self, cause: BaseException, where: str):
        self.error_id = uuid.uuid4().hex[:12]
        super().__init__(f"internal error {self.error_id} ({where})")
        log.error("internal error %s (%s)", self.error_id, where, exc_info=cause)


def failed_request(reply: bytes | str, rows: list[Any] | None) -> bool:
    """Did a reply answer nothing the client asked for through its own fault (a text frame for a bad request, or
    an explicit batch whose rows were all bad)? Internal errors are the server's, never counted."""
    if isinstance(reply, str):
        return reply.startswith("bad request")
    return bool(rows) and all(isinstance(r, BadRequest) for r in rows)


def prepare_rows(policy: InferPolicy, observations: list[dict[str, Any]]) -> list[Any]:
    """Each row validated and prepared on its own: a Prepared, a BadRequest, or an InternalError."""
    out: list[Any] = []
    for o in observations:
        try:
            out.append(policy.prepare_request(o))
        except BadRequest as e:
            out.append(e)
        except Exception as e:  # noqa: BLE001 - a bug of ours, reported with an id
            out.append(InternalError(e, "preparing a request"))
    return out


def run_rows(policy: InferPolicy, rows: list[Any]) -> list[Any]:
    """One forward over the prepared rows: their results, or (an internal failure) the same InternalError for
    each. Never retried row by row: rows are validated before, so a failure here is not one row's fault."""
    try:
        return list(policy.run_prepared(rows))
    except Exception as e:  # noqa: BLE001 - reported with an id
        return [InternalError(e, f"a forward of {len(rows)} rows")] * len(rows)


def error_text(e: BaseException) -> str:
    """What a client is told: the problem with its input, that the model's answer held no actions (and what it
    held), or an internal error's id (never a traceback)."""
    if isinstance(e, BadRequest):
        return "bad request: " + str(e)
    if isinstance(e, NoActions):
        return "no actions: " + str(e)
    if not isinstance(e, InternalError):
        e = InternalError(e, "answering a request")
    return f"{e}: the server's log has the details under this id"


def decode_request(message: bytes | str, max_message_bytes: int) -> dict[str, Any]:
    """A request frame -> its map (string keys). Raises BadMessage naming what is wrong."""
    if isinstance(message, str):
        raise BadMessage("expected a binary msgpack frame, got a text frame")
    if len(message) > max_message_bytes:
        raise BadMessage(f"message of {len(message)} bytes exceeds the server's limit of "
                         f"{max_message_bytes} bytes (pi0 serve --max-message-mb)")
    obs = msgpack_numpy.unpackb(message)
    if not isinstance(obs, dict):
        raise BadMessage(f"an observation must be a msgpack map, got {type(obs).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obs.items()}


def batch_rows(request: dict[str, Any], max_rows: int) -> list[dict[str, Any]]:
    """The observations of an explicit {"batch": [...]} request (at most max_rows)."""
    rows = request["batch"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise BadMessage("'batch' must be a non-empty list of observation maps")
    if len(rows) > max_rows:
        raise BadMessage(f"'batch' has {len(rows)} rows; this server answers at most {max_rows} per request "
                         "(pi0 serve --max-batch): split it")
    return [{k.decode() if isinstance(k, bytes) else k: v for k, v in r.items()} for r in rows]


def encode_reply(rows: list[Any], timing: dict[str, Any], explicit: bool, prev_total_ms: float | None) -> bytes | str:
    """Results (or a row's exception) -> the reply frame: msgpack, or a text frame for a failed single request."""
    timing = dict(timing)
    if prev_total_ms is not None:
        timing["prev_total_ms"] = prev_total_ms
    if not explicit:
        if isinstance(rows[0], BaseException):
            log.warning("request failed: %s", rows[0])
            return error_text(rows[0])
        return msgpack_numpy.packb({**rows[0], "server_timing": timing})
    # explicit batch: a failed row is answered as {"error": text}, the others as usual
    out = [{"error": error_text(r)} if isinstance(r, BaseException) else r for r in rows]
    return msgpack_numpy.packb({"batch": out, "server_timing": timing})


def decode_and_prepare(policy: InferPolicy, message: bytes | str, max_message_bytes: int, max_batch: int,
                       metrics: ServerMetrics) -> tuple[list[Any], bool, list[Any]]:
    """(each row prepared, or its BadRequest / InternalError; whether it was an explicit batch; the rows' decoded
    observations): run off the event loop. A message that is not even a request raises (see `refusal`)."""
    t0 = time.perf_counter()
    request = decode_request(message, max_message_bytes)
    explicit = "batch" in request
    observations = batch_rows(request, max_batch) if explicit else [request]
    rows = prepare_rows(policy, observations)
    metrics.observe("preprocess", (time.perf_counter() - t0) / len(rows))
    return rows, explicit, observations


def refusal(e: BaseException, metrics: ServerMetrics) -> str:
    """The text reply to a message that could not be read as a request, counted."""
    if isinstance(e, BadRequest):
        log.warning("bad request: %s", e)
        metrics.count("bad_request")
        return error_text(e)
    metrics.count("internal_error")
    return error_text(InternalError(e, "decoding a request"))


def record(results: list[Any], metrics: ServerMetrics) -> None:
    """Count each row's outcome and observe the model's stages of the answered ones."""
    for r in results:
        if isinstance(r, BadRequest):
            metrics.count("bad_request")
        elif isinstance(r, NoActions):
            log.warning("no actions: %s", r)
            metrics.count("no_actions")
        elif isinstance(r, Exception):
            metrics.count("internal_error")
        else:
            metrics.count("ok")
            for stage, seconds in r.get("policy_timing", {}).get("stages_s", {}).items():
                metrics.observe(stage, seconds)


def merge(rows: list[Any], answers: list[Any]) -> list[Any]:
    """Each row's answer in request order: its own error, or the next answer of the good rows."""
    it = iter(answers)
    return [r if isinstance(r, Exception) else next(it) for r in rows]
