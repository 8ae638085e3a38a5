"""The worker-side compression runtime (one per worker process).

It coordinates four parts, each with one job:
  * `WindowCapture` (engine/capture.py): the observation-window queries;
  * `LayerPageState` (engine/layer_state.py): per-layer page tables of every request;
  * the planner (vllm_kvcomp/planner.py): statistics -> budgets -> block plan;
  * `EvictionExecutor` (engine/executor.py): the kernels on the KV pool;
  * `DecodeRing` (engine/decode_ring.py, only with `evict_every`): the last decode queries.

Per step, driven by the model runner (engine/worker.py):
  1. `begin_step`: plan which prompt positions of this step are window queries
     and which decode tokens go to which decode-ring rows.
  2. `layer_tables` (attention metadata builder): every layer's page table, one launch.
  3. `capture` (attention forward, per layer): copy the window queries and LSE
     (and, with the ring on, every layer's decode queries and LSE).
  4. `end_step` (after sampling): compress every request whose prefill completed
     and report the freed blocks, which the scheduler returns to vLLM's BlockPool.

Every rank of a tensor-parallel group runs the same steps with the same
scheduler outputs; the only data-dependent decision, the budgets, is made from
statistics summed over all ranks' heads, so every rank frees the same blocks.
"""

from __future__ import annotations

import logging

import torch

from vllm_kvcomp import planner
from vllm_kvcomp.config import CompressionConfig
from vllm_kvcomp.engine.capture import CapturePlan, WindowCapture
from vllm_kvcomp.engine.decode_eviction import DecodeEvictor
from vllm_kvcomp.engine.decode_ring import DecodeRing
from vllm_kvcomp.engine.eviction import Evictor
from vllm_kvcomp.engine.executor import EvictionExecutor, PoolGeometry
from vllm_kvcomp.engine.layer_state import LayerPageState
from vllm_kvcomp.engine.records import CompressionReport, SkipRecord
from vllm_kvcomp.engine.requests import TrackedRequest
from vllm_kvcomp.engine.timing import EvictionTimer
from vllm_kvcomp.engine.verify import EvictionObserver, load_observer

logger = logging.getLogger("vllm.kvcomp")

_RUNTIME: CompressionRuntime | None = None


def get_runtime() -> CompressionRuntime:
    if _RUNTIME is None:
        raise RuntimeError("vllm-kvcomp: the compression runtime is not initialised in this process")
    return _RUNTIME


def set_runtime(runtime: CompressionRuntime | None) -> None:
    global _RUNTIME
    _RUNTIME = runtime


class CompressionRuntime:
    capture_buffers: WindowCapture
    pages: LayerPageState
    executor: EvictionExecutor
    geometry: PoolGeometry

    def __init__(self, config: CompressionConfig, vllm_config=None, observer: EvictionObserver | None = None):
        self.config = config
        self.vllm_config = vllm_config
        self.policies = planner.PolicyCache()
        self.requests: dict[str, TrackedRequest] = {}
        self.step_capture: CapturePlan | None = None
        self.decode_ring: DecodeRing | None = None  # the last decode queries (evict_every set)
        self.layer_index: dict[str, int] = {}
        self.observer = observer if observer is not None else load_observer()
        self._idx_mapping: torch.Tensor | None = None
        self._num_reqs = 0
        self._ready: list[TrackedRequest] = []
        self._skips: list[SkipRecord] = []
        self._region_cache: dict[tuple[str, int], torch.Tensor] = {}
        self.timer = EvictionTimer()

    # ------------------------------------------------------------------ setup
    def bind(self, runner, kv_cache_config) -> None:
        """Read the layout from vLLM's objects once the KV pool is allocated."""
        from vllm.distributed import get_tensor_model_parallel_world_size

        (group,) = kv_cache_config.kv_cache_groups
        forward_context = self.vllm_config.compilation_config.static_forward_context
        first_layer = forward_context[group.layer_names[0]]
        self.setup(
            layer_names=list(group.layer_names),
            pool=runner.kv_caches[0],
            blocks_per_layer=kv_cache_config.num_blocks,
            block_size=group.kv_cache_spec.block_size,
            num_heads=first_layer.impl.num_heads,
            scale=first_layer.impl.scale,
            max_reqs=runner.max_num_reqs,
            width=runner.block_tables.input_block_tables[0].shape[1],
            tp_size=get_tensor_model_parallel_world_size(),
            max_num_tokens=runner.max_num_tokens,
        )

    def setup(
        self,
        *,
        layer_names: list[str],
        pool: torch.Tensor,
        blocks_per_layer: int,
        block_size: int,
        num_heads: int,
        scale: float,
        max_reqs: int,
        width: int,
        tp_size: int = 1,
        max_num_tokens: int = 8192,  # vLLM's max_num_batched_tokens (bind passes it)
    ) -> None:
        """Allocate the runtime's buffers (pool: [L * N, 2, block_size, Hkv, D])."""
        L = len(layer_names)
        if pool.shape[0] != L * blocks_per_layer or pool.shape[2] != block_size:
            raise RuntimeError(
                f"vllm-kvcomp: expected one KV pool of {L} x {blocks_per_layer} pages of "
                f"{block_size} tokens, got {tuple(pool.shape)}"
            )
        self.layer_names = layer_names
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        self.pool, self.device = pool, pool.device
        self.width = width
        self.geometry = PoolGeometry(L, blocks_per_layer, block_size, pool.shape[3], pool.shape[4], num_heads, scale)
        self.capture_buffers = WindowCapture(
            num_layers=L,
            slots=self.config.max_pending_requests,
            window=self.config.window,
            num_heads=num_heads,
            head_size=pool.shape[4],
            dtype=pool.dtype,
            device=self.device,
        )
        self.decode_ring = self._decode_ring(L, num_heads, pool, max_reqs, max_num_tokens)
        self.pages = LayerPageState(
            num_layers=L,
            blocks_per_layer=blocks_per_layer,
            block_size=block_size,
            max_reqs=max_reqs,
            width=width,
            device=self.device,
        )
        self.executor = EvictionExecutor(pool, self.geometry, self.config, tp_size)
        self.timer = EvictionTimer(on_cuda=self.device.type == "cuda")
        self.evictor = Evictor(self)
        self.decode_evictor = DecodeEvictor(self, max_reqs)  # evict_every: evicts again while decoding
        self.executor.warm_up(self.config.window)
        self.pages.warm_up()
        logger.info(
            "vllm-kvcomp: %s, %d layers x %d blocks of %d tokens in one pool; "
            "%.1f MiB of page tables, %.1f MiB of window buffers",
            self.config.method,
            L,
            blocks_per_layer,
            block_size,
            self.pages.nbytes / 2**20,
            self.capture_buffers.nbytes / 2**20,
        )

    def _decode_ring(
        self, num_layers: int, num_heads: int, pool: torch.Tensor, max_reqs: int, max_num_tokens: int
    ) -> DecodeRing | None:
        """The decode-query ring (one slot per running request), only when some request can evict while
        decoding: a budget-1.0 server that denies per-request settings needs none."""
        if not self.config.decode_ring_needed:
            return None
        ring = DecodeRing(
            num_layers=num_layers,
            slots=max_reqs,
            window=self.config.decode_window,
            num_heads=num_heads,
            head_size=pool.shape[4],
            dtype=pool.dtype,
            max_num_tokens=max_num_tokens,
            max_reqs=max_reqs,
            device=pool.device,
        )
        logger.info("vllm-kvcomp: %.1f MiB of decode-query ring buffers", ring.nbytes / 2**20)
        return ring

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    def layer_region(self, layer_name: str, kv_cache: torch.Tensor) -> torch.Tensor:
        """The layer's own N pages of the pool: vLLM's slot mapping addresses these."""
        key = (layer_name, kv_cache.data_ptr())
        region = self._region_cache.get(key)
        if region is None:
            i = self.layer_index[layer_name]
            n = kv_cache.shape[0] // self.num_layers
            region = self._region_cache[key] = kv_cache[i * n : (i + 1) * n]
        return region

    # ------------------------------------------------------ request lifecycle
    def add_request(
        self,
        req_id: str,
        index: int,
        block_ids: list[int],
        prompt_len: int,
        config: CompressionConfig | None = None,
    ) -> None:
        """Track a new request; `config` overrides the server's method/budget for it."""
        self.remove_request(req_id)
        self.pages.reset(index)
        compress = (config or self.config).should_compress(prompt_len)
        req = self.requests[req_id] = TrackedRequest(req_id, index, list(block_ids), prompt_len, compress, config)
        # A ring slot, and per-step bookkeeping, only for requests that can be evicted while decoding: the
        # others (budget 1.0, `none`, `kv_evict_every: off`) cost nothing per step (their rows write the
        # ring's scratch row).
        if self.decode_ring is not None and (config or self.config).evicts_while_decoding:
            req.evicts_while_decoding = True
            self.decode_ring.assign(req_id, index)
        self.decode_evictor.follow(req)

    def append_blocks(self, req_id: str, block_ids: list[int]) -> None:
        req = self.requests.get(req_id)
        if req is not None:
            req.block_ids.extend(block_ids)

    def remove_request(self, req_id: str) -> None:
        req = self.requests.pop(req_id, None)
        if req is not None:
            self.capture_buffers.release(req)
            self.pages.reset(req.index)
        if self.decode_ring is not None:
            self.decode_ring.release(req_id)

    # ------------------------------------------------------------------- step
    def begin_dummy_step(self) -> None:
        self._idx_mapping = None
        self.step_capture = None
        self._ready = []
        if self.decode_ring is not None:
            self.decode_ring.clear_dst()

    def begin_step(self, input_batch) -> None:
        """Plan this step's window capture (prefill rows) and decode-ring rows (host side)."""
        self._idx_mapping = input_batch.idx_mapping
        self._num_reqs = input_batch.num_reqs
        step = self.capture_buffers.plan_step(input_batch, self.requests)
        for req in step.no_slot:
            req.finished = True
            self._skip(req, "capture_slots")
        self.step_capture = step.plan
        self._ready = step.ready
        if self.decode_ring is not None:  # before the metadata build and any FULL graph replay
            self.decode_ring.plan_step(input_batch)
        self.decode_evictor.note_step(input_batch)  # each request's context after this step (host)

    def layer_tables(self, block_table: torch.Tensor, seq_lens: torch.Tensor):
        """Per-layer page tables and lengths for this batch (views of persistent buffers)."""
        return self.pages.build(block_table, seq_lens, self._idx_mapping, self._num_reqs)

    def capture(self, layer: int, query: torch.Tensor, lse: torch.Tensor, plan: CapturePlan) -> None:
        self.capture_buffers.capture(layer, query, lse, plan)

    def end_step(self) -> CompressionReport | None:
        self.capture_buffers.mark_executed(self.step_capture)
        self.step_capture = None
        ready, self._ready = self._ready, []
        batch = []
        for req in ready:
            if req.finished or req.req_id not in self.requests:
                continue
            req.finished = True
            if not req.window_captured():
                # All window rows ran inside a FULL CUDA graph (1-token final chunk, window 1).
                self._skip(req, "no_window_queries")
                self.capture_buffers.release(req)
                continue
            batch.append(req)
        report = CompressionReport(skips=self._skips, eviction_seconds=self.timer.completed())
        self._skips = []
        if batch:
            report.extend(self._evict(batch))
        report.extend(self.decode_evictor.step())  # after the prefill evictions: one batch of those due
        report.eviction_host_seconds = self.timer.host()
        return report if report else None

    def _skip(self, req: TrackedRequest, reason: str) -> None:
        logger.warning("vllm-kvcomp: request %s served uncompressed (%s)", req.req_id, reason)
        self._skips.append(SkipRecord(req.req_id, reason))

    # --------------------------------------------------------------- eviction
    def _evict(self, batch: list[TrackedRequest]) -> CompressionReport:
        return self.evictor.evict(batch)
