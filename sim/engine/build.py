"""What an engine is made of, built from `EngineArgs`: the timing side (cost model, memory plan),
the functional side (the NumPy model, quantized and sharded as asked), and per run a KV manager,
a scheduler and an executor; plus the one-line report header that names all of them.

Kept apart from the event loop (`sim.engine.engine`) so that the loop reads as the data flow of
DESIGN.md and each feature's wiring sits in one place.

References: vLLM `vllm/engine/arg_utils.py` (EngineArgs -> configs), `vllm/v1/engine/core.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batching import SCHEDULER_OPTIONS, SCHEDULERS
from batching.commit import StopCriteria
from cache import KV_CACHES
from cache.paged import PagedKVCache
from parallel.plan import plan_gpu_memory
from sim.core.errors import ConfigError
from sim.core.protocols import Executor, KVCacheManager, Scheduler
from sim.executor.timing import TimingExecutor
from sim.timing.cost_model import CostModel
from sim.timing.memory_plan import MemoryPlan

if TYPE_CHECKING:
    from sim.engine.engine import Engine


def build_cost_model(engine: Engine, kv_dtype: str | None) -> Any:
    """The step pricer: per GPU, or the parallel plan's (with its collectives)."""
    if engine.sharded:
        from parallel.cost import ParallelCostModel

        return ParallelCostModel(engine.model_config, engine.hardware, engine.plan,
                                 dtype=engine.timing_dtype, kv_cache_dtype=kv_dtype,
                                 quantization=engine.quantization)
    cost = CostModel(engine.model_config, engine.hardware, dtype=engine.timing_dtype,
                     kv_cache_dtype=kv_dtype, quantization=engine.quantization)
    eviction = engine.args.eviction()
    if eviction is not None:  # attention reads only the kept tokens
        from cache.kv_eviction import EvictedContextCost

        return EvictedContextCost(cost, eviction.budget)
    return cost


def build_memory_plan(engine: Engine, kv_dtype: str | None) -> MemoryPlan:
    """One GPU's memory (the binding pipeline stage's when the plan splits the model)."""
    args, quant = engine.args, engine.quantization
    base = getattr(engine.cost_model, "base", engine.cost_model)
    memory = plan_gpu_memory(
        engine.plan, engine.model_config, engine.hardware,
        dtype=engine.timing_dtype if quant is None else quant.weight_format,
        kv_cache_dtype=kv_dtype or (None if quant is None else base.act_dtype),
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=engine.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        block_size=args.block_size,
    )
    if quant is not None:  # scale bytes counted; 16-bit embedding, head, norms
        from sim.timing.quantization import quantized_memory_plan

        memory = quantized_memory_plan(memory, engine.model_config, quant, engine.plan.tp,
                                       engine.plan.pp)
    return memory


def build_functional(engine: Engine) -> tuple[Any, Any, frozenset[int], str]:
    """The functional model (quantized, then sharded, as asked), its tokenizer, EOS ids and a
    description for the report header."""
    from sim.model.proxy import load_functional_model

    args = engine.args
    model, tokenizer = load_functional_model(args.functional_model or args.model,
                                             dtype=args.functional_dtype)
    eos = frozenset(e for e in {tokenizer.eos_token_id, *model.config.eos_token_ids}
                    if e is not None)
    if engine.quantization is not None:
        from sim.model.quantization.apply import quantize_model

        model = quantize_model(model, engine.quantization, tokenizer=tokenizer, seed=args.seed)
    description = f"{model.config.name} ({args.functional_dtype})"
    if engine.sharded:
        from parallel.tensor import ShardedModel
        from sim.model.quantization.apply import tag_activation_quant

        model = ShardedModel(model, engine.plan)
        tag_activation_quant(model, getattr(engine.quantization, "act_format", None))
        description += f" sharded {engine.plan.describe()}"
    return model, tokenizer, eos, description


def kv_text(engine: Engine) -> str:
    """The KV-cache choice with its options, for report headers."""
    a = engine.args
    if a.kv_cache == "paged":
        extra = ", prefix caching" if a.enable_prefix_caching else ""
        swap = f" {a.swap_space:g} GiB" if a.preemption_mode == "swap" else ""
        text = f"paged (block {a.block_size}{extra}, preemption {a.preemption_mode}{swap})"
    elif a.kv_cache == "contiguous":
        text = f"contiguous ({a.contiguous_reservation})"
    else:
        return a.kv_cache
    if a.kv_cache_dtype != "auto":
        text += f", kv_cache_dtype={a.kv_cache_dtype}"
    if a.kv_eviction is not None:
        text += f", kv_eviction={a.kv_eviction} (budget {a.eviction().budget})"
    return text


def build_kv_manager(engine: Engine, num_blocks: int | None = None) -> KVCacheManager:
    """A KV manager over `num_blocks` blocks of `block_size` token slots (default: the engine's
    whole pool; a pipeline-parallel lane gets its 1/pp share)."""
    args = engine.args
    num_blocks = engine.num_kv_blocks if num_blocks is None else num_blocks
    if args.kv_cache == "none":
        return KV_CACHES["none"]()
    if args.kv_cache == "paged":
        paged = PagedKVCache(
            num_blocks, args.block_size,
            enable_prefix_caching=args.enable_prefix_caching,
            preemption_mode=args.preemption_mode,
            num_swap_blocks=int(args.swap_space * 2**30 // engine.kv_block_bytes),
            eviction=args.eviction())
        paged.record_block_ops = args.mode == "functional"
        return paged
    return KV_CACHES[args.kv_cache](num_blocks * args.block_size, engine.max_model_len,
                                    args.contiguous_reservation)


def build_scheduler(engine: Engine, kv: KVCacheManager) -> Scheduler:
    """The scheduler of `EngineArgs.scheduler` over `kv`, with its options (and, with
    speculative decoding, the policy that says how many drafts each decode verifies)."""
    stop = StopCriteria(engine.eos_token_ids, engine.max_model_len)
    name = engine.args.scheduler
    options: dict[str, Any] = {key: getattr(engine.args, key) for key in SCHEDULER_OPTIONS[name]}
    if engine.speculation is not None:  # (`Speculation` refuses schedulers other than continuous)
        options["speculation"] = engine.speculation
    return SCHEDULERS[name](kv, stop, engine.args.max_num_seqs, engine.max_num_batched_tokens,
                            **options)


def make_executor(engine: Engine, retains_kv: bool, kv: KVCacheManager | None = None) -> Executor:
    args = engine.args
    if args.mode == "timing":
        return TimingExecutor()
    if engine.sharded:
        from parallel.sharded_kv import ShardedExecutor

        if args.kv_cache_dtype != "auto":
            raise ConfigError(
                f"kv_cache_dtype={args.kv_cache_dtype!r} with a sharded functional model is not "
                "supported (per-GPU stores are unquantized); use mode='timing' or "
                "tensor_parallel_size = pipeline_parallel_size = 1")
        return ShardedExecutor(engine.functional_model, retains_kv, engine.max_model_len, kv)
    from sim.executor.functional import NumpyExecutor

    return NumpyExecutor(engine.functional_model, retains_kv, engine.max_model_len, kv,
                         kv_cache_dtype=args.kv_cache_dtype, kv_eviction=args.eviction())
