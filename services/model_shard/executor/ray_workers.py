"""Tensor and pipeline parallel execution over Ray: one worker actor per (pipeline stage, tensor rank).

The scheduler stays in the shard's process; each step, every worker receives the same scheduler
output (one object in Ray's store) and runs its part:

- Tensor parallel: a worker holds its share of the attention heads, KV heads and MLP columns
  (column-parallel QKV and gate/up, row-parallel o_proj and down_proj), and its share of the KV
  cache; the row-parallel outputs are summed with an all-reduce over the stage's tensor group.
  The embedding and LM head are replicated.
- Pipeline parallel: a stage holds a contiguous range of layers; hidden states go stage to stage
  with send/recv. The step's sequences are cut into micro-batches, so stage s works on micro-batch
  i while stage s+1 works on micro-batch i-1.

The last stage's tensor rank 0 samples and returns the tokens. torch.distributed joins the workers:
gloo on CPU (NCCL is for CUDA tensors, which the model runner does not place yet).
Ray joins an existing cluster when RAY_ADDRESS is set (KubeRay), else starts a local one. A worker
that dies fails the step with WorkerDiedError; the shard then rebuilds all of them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch

from services.model_shard.engine.engine import ExecutorLost
from services.model_shard.engine.scheduler import ModelRunnerOutput, ScheduledSeq, SchedulerOutput

log = logging.getLogger(__name__)

# Passed into the workers so their spans and logs go where the shard's go.
FORWARDED_ENV = ("LLMMESH_TRACE_DIR", "LLMMESH_LOG_FORMAT", "LLMMESH_LOG_LEVEL", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_INSECURE", "OTEL_BSP_SCHEDULE_DELAY", "OTEL_TRACES_SAMPLER",
                 "OTEL_TRACES_SAMPLER_ARG", "OTEL_RESOURCE_ATTRIBUTES", "PYTHONPATH",
                 "RAY_ADDRESS")  # a worker of an existing cluster binds gloo to its node's address


PEER_DEATH_WAIT_S = 5.0  # how long a failed step waits to learn whether a worker died under it


def _dead_worker(pending: list, index: dict, timeout_s: float = PEER_DEATH_WAIT_S) -> int | None:
    """The rank of a worker among `pending` calls that died, seen within timeout_s, or None."""
    import ray
    from ray.exceptions import RayActorError, WorkerCrashedError

    if not pending:
        return None
    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
    for ref in ready:
        try:
            ray.get(ref)
        except (RayActorError, WorkerCrashedError):
            return index[ref]
        except Exception:  # noqa: BLE001 - another failed rank; keep looking for a dead one
            continue
    return None


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _address_towards(address: str) -> str | None:
    """The local IP address this host reaches HOST:PORT from, or None (another form: "auto", ray://)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in host:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, int(port)))  # UDP: picks the route, sends nothing
            return s.getsockname()[0]
    except OSError:
        return None


def _interface_of(ip: str) -> str | None:
    """The network interface that holds this address, or None."""
    import psutil

    return next((name for name, addrs in psutil.net_if_addrs().items()
                 if any(a.family == socket.AF_INET and a.address == ip for a in addrs)), None)


class WorkerDiedError(ExecutorLost):
    """A parallel worker process is gone; the step cannot finish."""


class WorkersUnplaced(ExecutorLost):
    """The Ray cluster cannot place the workers now (e.g. a node is gone); a later try may."""


def micro_batches(scheduled: list[ScheduledSeq], stages: int) -> list[list[ScheduledSeq]]:
    """Contiguous, near-equal slices by token count (so concatenated results stay in order)."""
    if stages <= 1 or len(scheduled) < 2:
        return [scheduled]
    n = min(stages, len(scheduled))
    total = sum(item.num_new_tokens for item in scheduled)
    out, current, done = [], [], 0
    for item in scheduled:
        current.append(item)
        done += item.num_new_tokens
        if len(out) < n - 1 and done >= total * (len(out) + 1) / n:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


class ModelWorker:
    """One rank: a partition of the model and of the KV cache. Made a Ray actor by RayExecutor."""

    def __init__(self, model_dir: str, dtype: str, quantization: str | None, rank: int, tensor_parallel: int,
                 pipeline_parallel: int, threads: int, native_kernels: bool = True, kv_cache_dtype: str = "auto"):
        self.model_dir, self.dtype, self.quantization = model_dir, dtype, quantization
        self.kv_cache_dtype = kv_cache_dtype
        self.native_kernels = native_kernels
        self.rank, self.tp, self.pp = rank, tensor_parallel, pipeline_parallel
        self.tp_rank, self.stage = rank % tensor_parallel, rank // tensor_parallel
        if threads:
            torch.set_num_threads(threads)
        from services.common.telemetry import setup_tracing

        setup_tracing("model_shard_worker", f"rank{rank}-pid{os.getpid()}")

    def place(self) -> tuple[int, str]:
        """This worker's process id, and the address of the Ray node it runs on."""
        return os.getpid(), _node_ip()

    def rendezvous_address(self) -> str:
        """host:port for torch.distributed's TCP store, on this (rank 0's) node: the address Ray knows
        the node by (a hostname may resolve to another interface, or to loopback)."""
        host = _node_ip() if os.environ.get("RAY_ADDRESS") else "127.0.0.1"
        with socket.socket() as s:
            s.bind((host, 0))
            return f"{host}:{s.getsockname()[1]}"

    def init(self, rendezvous: str, block_size: int, num_blocks: int) -> int:
        """Join the process groups, load this rank's partition, allocate its KV cache; returns the
        KV bytes per block of this rank."""
        import torch.distributed as dist

        from services.model_shard.engine.engine import DTYPES
        from services.model_shard.executor.local import LocalExecutor
        from services.model_shard.model.llama import LlamaConfig, Partition, load_model, stage_layers

        world = self.tp * self.pp
        if os.environ.get("RAY_ADDRESS") and "GLOO_SOCKET_IFNAME" not in os.environ:
            interface = _interface_of(_node_ip())
            if interface:  # gloo's peers connect to the interface of Ray's node address, not the hostname's
                os.environ["GLOO_SOCKET_IFNAME"] = interface
        dist.init_process_group("gloo", init_method=f"tcp://{rendezvous}", rank=self.rank, world_size=world,
                                timeout=timedelta(seconds=120))
        # Every rank creates every group, in the same order (torch.distributed requires it).
        for stage in range(self.pp):
            group = dist.new_group([stage * self.tp + i for i in range(self.tp)])
            if stage == self.stage:
                self.tp_group = group
        cfg = LlamaConfig.from_dir(self.model_dir)
        first, last = stage_layers(cfg.num_layers, self.pp, self.stage)
        model = load_model(self.model_dir, DTYPES[self.dtype], self.quantization,
                           Partition(self.tp_rank, self.tp, first, last), self.native_kernels)
        if self.tp > 1:
            group = self.tp_group

            def all_reduce(t: torch.Tensor) -> torch.Tensor:
                dist.all_reduce(t, group=group)
                return t

            model.set_tensor_parallel_reduce(all_reduce)
        self.model = model
        self.hidden_size = cfg.hidden_size
        self.is_last_stage = self.stage == self.pp - 1
        self.runner = LocalExecutor(model, num_blocks, block_size, self.kv_cache_dtype)
        return self.runner.kv_cache_bytes_per_block

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        return self.runner.export_blocks(block_ids)

    def import_blocks(self, block_ids: list[int], values: list[bytes]) -> None:
        self.runner.import_blocks(block_ids, values)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput | None:
        import torch.distributed as dist

        returns = self.is_last_stage and self.tp_rank == 0
        if not out.scheduled:
            return ModelRunnerOutput([], []) if returns else None
        output = ModelRunnerOutput([], [], [])
        in_flight = []  # (work, tensor): isend buffers must outlive the send
        for batch in micro_batches(out.scheduled, self.pp):
            started = time.time_ns()
            input_ids, positions, meta, sample_index = self.runner.prepare(batch)
            hidden = None
            if self.stage > 0:
                hidden = torch.empty(len(input_ids), self.hidden_size, dtype=self.model.dtype)
                dist.recv(hidden, src=self.rank - self.tp)
            x = self.model(input_ids, positions, self.runner.kv_caches, meta, hidden=hidden)
            if not self.is_last_stage:
                x = x.contiguous()
                in_flight.append((dist.isend(x, dst=self.rank + self.tp), x))
            elif returns:
                output.extend(self.runner.sample(batch, x, sample_index))
            self._trace_prefills(batch, started, time.time_ns())
        for work, _ in in_flight:
            work.wait()
        return output if returns else None


    def _trace_prefills(self, batch: list[ScheduledSeq], start_ns: int, end_ns: int) -> None:
        """A span in each request's trace for this rank's part of its prefill. Decode steps are
        not traced per request: one span per rank per token would drown the trace."""
        from opentelemetry import propagate

        from services.common.telemetry import tracer

        for item in batch:
            if item.num_new_tokens > 1 and item.seq.trace_carrier:
                span = tracer("llmmesh.worker").start_span(
                    "worker.forward", context=propagate.extract(item.seq.trace_carrier), start_time=start_ns,
                    attributes={"llmmesh.rank": self.rank, "llmmesh.pipeline_stage": self.stage,
                                "llmmesh.tensor_rank": self.tp_rank, "llmmesh.tokens": item.num_new_tokens,
                                "llmmesh.batch_tokens": sum(i.num_new_tokens for i in batch)})
                span.end(end_time=end_ns)


def connect_ray(ranks: int = 1) -> None:
    """Join the Ray cluster at RAY_ADDRESS, or start a local one (no-op when already connected).

    Call it from the main thread of a long-lived process: a local cluster's processes are started
    with a parent-death signal, which Linux delivers when the *thread* that started them ends.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        # This process's node is the one at the address that reaches the head: without it, Ray may
        # take the head's address for its own and its workers cannot reach this driver's objects.
        own = _address_towards(address)
        ray.init(address=address, log_to_driver=False, **({"_node_ip_address": own} if own else {}))
    else:
        # Ray waits 30 s for its GCS to bind a port; a busy small machine (a CI runner, a node that
        # is loading models) has taken longer. A GCS that never wrote its port at all was a hang,
        # not slowness: Ray forks it with a preexec_fn, and a fork while another thread holds a lock
        # (gRPC's, in a test process) can leave the child stuck. Start Ray from the main thread before
        # serving, as the shard does (and the tests' conftest), rather than trusting this wait.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
        # Its CPUs are logical slots, one per rank (a rank's torch threads are threads_per_worker):
        # room for 16 ranks even on a small machine.
        ray.init(address="local", num_cpus=max(16, ranks, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False)


class RayExecutor:
    """The engine's executor for tensor x pipeline parallel shards (same execute() as LocalExecutor)."""

    def __init__(self, model_dir: str | Path, config, num_blocks: int):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.tp, self.pp = config.tensor_parallel_size, config.pipeline_parallel_size
        world = self.tp * self.pp
        connect_ray(world)
        use_gpu = torch.cuda.is_available() and bool(ray.cluster_resources().get("GPU"))
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        self.workers: list = []
        self._pg = placement_group([bundle] * world, strategy=config.placement_strategy)
        try:
            ray.get(self._pg.ready(), timeout=config.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self._pg)
            raise WorkersUnplaced(f"the Ray cluster cannot place {world} workers of {bundle} within "
                                  f"{config.placement_timeout_s:g}s (it has {ray.available_resources()})") from None
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        root = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        actor = ray.remote(ModelWorker)
        self.workers = [
            actor.options(num_cpus=1, num_gpus=1 if use_gpu else 0, runtime_env={"env_vars": env},
                          scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank))
            .remote(str(model_dir), config.dtype, config.quantization, rank, self.tp, self.pp, config.threads_per_worker,
                    config.native_kernels, config.kv_cache_dtype)
            for rank in range(world)
        ]
        self._output_rank = world - self.tp  # the last stage's tensor rank 0 samples
        try:
            rendezvous = self._gather([self.workers[0].rendezvous_address.remote()])[0]
            # Each rank's share of a block's bytes; a block travels as their concatenation, by rank.
            self.rank_block_bytes = self._gather([w.init.remote(rendezvous, config.block_size, num_blocks)
                                                  for w in self.workers])
        except BaseException:
            self.shutdown()
            raise

    def _gather(self, refs: list) -> list:
        """Results in order; WorkerDiedError as soon as any worker dies (the others may be blocked
        in a collective waiting for it, so this cannot wait for all of them first)."""
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError

        index = {ref: i for i, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    results[index[ref]] = ray.get(ref)
                except (RayActorError, WorkerCrashedError) as exc:
                    raise WorkerDiedError(f"parallel worker {index[ref]} died: {type(exc).__name__}") from exc
                except Exception as exc:
                    # A rank whose peer was killed fails its collective (gloo: connection closed) before
                    # Ray reports the death: look at the others before calling this a failed step.
                    dead = _dead_worker(pending, index)
                    if dead is not None:
                        raise WorkerDiedError(f"parallel worker {dead} died (worker {index[ref]} failed with "
                                              f"it: {type(exc).__name__})") from exc
                    raise
        return results

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        import ray

        step = ray.put(out)
        return self._gather([w.execute.remote(step) for w in self.workers])[self._output_rank]

    @property
    def kv_cache_bytes_per_block(self) -> int:
        return sum(self.rank_block_bytes)

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """uint8 [n, bytes per block]: every rank's part of each block, concatenated by rank."""
        return torch.cat(self._gather([w.export_blocks.remote(block_ids) for w in self.workers]), dim=1)

    def import_blocks(self, block_ids: list[int], values: list[bytes]) -> None:
        """Each rank gets its slice of every block (LLMEngine.import_blocks has checked their size)."""
        refs, offset = [], 0
        for worker, size in zip(self.workers, self.rank_block_bytes):
            refs.append(worker.import_blocks.remote(block_ids, [v[offset : offset + size] for v in values]))
            offset += size
        self._gather(refs)

    def worker_places(self) -> list[tuple[int, str]]:
        return [tuple(place) for place in self._gather([w.place.remote() for w in self.workers])]

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        remove_placement_group(self._pg)
