"""The engine's static-shape runner: a call is planned on the host into a bucket, copied into that bucket's buffers
and replayed: on CUDA from a graph captured once per bucket, elsewhere by calling the same work directly (the
capture is the one step that differs). Optionally with the denoising step compiled as one graph.

One call at a time (a lock: a bucket's buffers are shared), and a capture that only watches its own thread
(`capture_error_mode="thread_local"`), so that a server's other threads may use the GPU while a bucket is captured.
These are manual graphs, not torch.compile's cudagraph trees, whose thread-local state is what breaks when a server
replays from another thread (pytorch#123177). A bucket whose capture fails is called directly, and says why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from pi0.backends.engine.buckets import Bucket, BucketRules, Buffers, patches_per_image, plan_call
from pi0.model.config import Pi0Config
from pi0.model.observation import Observation

log = logging.getLogger(__name__)
WARMUP_RUNS = 3  # eager runs on a side stream before a capture (allocator and kernels settle; the usual recipe)


class BucketEngine(Protocol):
    """What the runner needs of an engine (`Pi0Engine`): its config, dtypes, device and packed weights, the static call
    of a bucket and the denoising step."""

    config: Pi0Config
    dtype: torch.dtype
    vision_dtype: torch.dtype
    device: torch.device
    w: Any

    def sample_bucket(self, buf: Buffers, bucket: Bucket, step: Callable[..., Tensor] | None = None) -> None: ...

    def euler_step(self, *args: Any) -> Tensor: ...


def compiled_step(engine: BucketEngine) -> Callable[..., Tensor]:
    """The engine's Euler step under torch.compile, whole (fullgraph: a graph break is an error), with symbolic
    batch and prefix sizes so that every bucket beyond the first of batch 1 and the first of a larger batch reuses
    the graph (torch specialises a size of 1)."""
    return torch.compile(engine.euler_step, fullgraph=True, dynamic=True)


@dataclass
class Entry:
    """A bucket's buffers, its CUDA graph (None: the work is called directly) and what preparing it cost."""

    buffers: Buffers
    graph: object | None
    seconds: float
    why: str = ""  # why there is no graph where one was asked for


class GraphRunner:
    """Static-shape calls of one engine. capture: CUDA graphs (default: on CUDA devices); compile: the denoising
    step compiled (`compiled_step`)."""

    def __init__(self, engine: BucketEngine, rules: BucketRules | None = None, capture: bool | None = None,
                 compile: bool = False):
        self.engine = engine
        self.rules = rules or BucketRules()
        self.capture = engine.device.type == "cuda" if capture is None else capture
        if self.capture and engine.device.type != "cuda":
            raise ValueError(f"CUDA graphs capture on CUDA devices; the engine is on {engine.device}")
        self.step = compiled_step(engine) if compile else None
        self.entries: dict[Bucket, Entry] = {}
        self.replays = 0
        self.lock = threading.Lock()

    def prepare(self, bucket: Bucket) -> Entry:
        """The bucket's entry: allocated (and on CUDA warmed up and captured) the first time it is asked for."""
        if bucket in self.entries:
            return self.entries[bucket]
        t0 = time.perf_counter()
        e = self.engine
        buf = Buffers.allocate(e.config, bucket, e.dtype, e.vision_dtype, e.device, len(e.w.expert_layers))
        graph, why = None, ""
        if self.capture:
            try:
                graph = self._capture(buf, bucket)
            except RuntimeError as err:  # called directly instead: slower, never wrong
                why = f"capture failed: {str(err).splitlines()[0][:200]}"
                log.warning("bucket %s: %s; its calls run without a graph", bucket, why)
        self.entries[bucket] = Entry(buf, graph, time.perf_counter() - t0, why)
        return self.entries[bucket]

    def _capture(self, buf: Buffers, bucket: Bucket):
        e = self.engine
        side = torch.cuda.Stream(device=e.device)
        side.wait_stream(torch.cuda.current_stream(e.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                e.sample_bucket(buf, bucket, self.step)
        torch.cuda.current_stream(e.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            e.sample_bucket(buf, bucket, self.step)
        torch.cuda.synchronize(e.device)
        return graph

    def __call__(self, obs: Observation, noise: Tensor, num_steps: int) -> Tensor:
        """actions [B, H, action_dim] fp32 for a validated observation and its noise."""
        plan = plan_call(self.engine.config, obs, num_steps, self.rules)
        with self.lock:
            entry = self.prepare(plan.bucket)
            entry.buffers.fill(plan, obs, noise)
            if entry.graph is not None:
                entry.graph.replay()
            else:
                self.engine.sample_bucket(entry.buffers, plan.bucket, self.step)
            self.replays += 1
            return entry.buffers.out[:plan.rows].clone()

    def warmup(self, buckets: Iterable[Bucket]) -> dict[Bucket, float]:
        """Prepare these buckets now (before a robot asks); seconds each took."""
        with self.lock:
            return {b: self.prepare(b).seconds for b in buckets}

    def warm(self, cameras: int, max_tokens: int, batches: Iterable[int], num_steps: int,
             image_size: int | None = None) -> dict[Bucket, float]:
        """`warmup` of every bucket of calls with `cameras` valid cameras, 1..max_tokens prompt tokens and these batch
        sizes (`buckets_for`); image_size: default the model's."""
        size = image_size or self.engine.config.vision.image_size
        return self.warmup(buckets_for(self.engine.config, self.rules, size, cameras, max_tokens, batches, num_steps))


def buckets_for(config: Pi0Config, rules: BucketRules, image_size: int, cameras: int, max_tokens: int,
                batches: Iterable[int], num_steps: int) -> list[Bucket]:
    """Every bucket calls of up to `cameras` valid cameras a row and 1..max_tokens prompt tokens fall in, at these
    batch sizes (what `pi0 serve` warms up for its configuration)."""
    n_patch = patches_per_image(config, image_size)
    out = []
    for b in sorted({rules.batch(n) for n in batches}):
        for n in range(1, max_tokens + 1):
            bucket = Bucket(b, cameras, rules.prefix(cameras * n_patch + n), num_steps, image_size)
            if bucket not in out:
                out.append(bucket)
    return out
