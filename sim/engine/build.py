"""What an engine is made of, built from `EngineArgs`: the timing side (cost model, memory plan),
the functional side (the NumPy model, quantized and sharded as asked), and per run a KV manager,
a scheduler and an executor (`build_executor`, the one constructor of every executor); plus the
one-line report header that names all of them.

Kept apart from the event loop (`sim.engine.loop`) so that the loop reads as the data flow of
ARCHITECTURE.md ("one step, one contract") and each feature's wiring sits in one place.

References: vLLM `vllm/engine/arg_utils.py` (EngineArgs -> configs), `vllm/v1/engine/core.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batching import SCHEDULER_OPTIONS, SCHEDULERS
from batching.commit import StopCriteria
from cache import KV_CACHES
from cache.paged import PagedKVCache
from parallel.expert import ExpertImbalanceModel, ExpertLoadSpec, ExpertLoadSummary
from parallel.plan import plan_gpu_memory
from sim.core.errors import ConfigError
from sim.core.protocols import Executor, KVCacheManager, Pricer, Scheduler
from sim.executor.timing import TimingExecutor
from sim.model.tokenizer import ByteTokenizer
from sim.timing.cost_model import CostModel
from sim.timing.memory_plan import MemoryPlan, with_draft
from speculative.config import draft_model_shape, draft_tp

if TYPE_CHECKING:
    from sim.engine.engine import Engine


def build_cost_model(engine: Engine, kv_dtype: str | None) -> Pricer:
    """The step pricer: per GPU, or the parallel plan's (with its collectives); under KV
    eviction, attention reads at most the eviction budget of cached tokens per sequence."""
    eviction = engine.args.eviction()
    cap = None if eviction is None else eviction.budget
    skew = build_expert_load(engine)
    if engine.sharded:
        from parallel.collectives import CommMode
        from parallel.cost import ParallelCostModel

        mode = CommMode.from_flags(engine.args.enforce_eager,
                                   engine.args.disable_custom_all_reduce)
        return ParallelCostModel(engine.model_config, engine.hardware, engine.plan,
                                 dtype=engine.timing_dtype, kv_cache_dtype=kv_dtype,
                                 quantization=engine.quantization, kv_context_cap_tokens=cap,
                                 comm_mode=mode, expert_load=skew)
    return CostModel(engine.model_config, engine.hardware, dtype=engine.timing_dtype,
                     kv_cache_dtype=kv_dtype, quantization=engine.quantization,
                     kv_context_cap_tokens=cap)


def build_expert_load(engine: Engine) -> ExpertImbalanceModel | None:
    """The priced expert-rank skew of `expert_load` (None: uniform); a skew needs experts
    spread over ranks (an MoE model with enable_expert_parallel at tensor_parallel_size > 1)."""
    args, model = engine.args, engine.model_config
    spec = ExpertLoadSpec.parse(args.expert_load)
    if spec.is_uniform:
        return None
    if not (model.is_moe and engine.sharded and engine.plan.ep > 1):
        raise ConfigError(
            f"expert_load={args.expert_load!r} prices the skew of expert-parallel ranks; "
            f"{model.name} at {engine.plan.describe()} has none (it needs an MoE model with "
            "enable_expert_parallel=True and tensor_parallel_size > 1); leave it 'uniform'")
    return ExpertImbalanceModel(spec, model.n_expert, model.n_expert_per_tok, engine.plan.ep,
                                args.seed)


def measured_expert_load(engine: Engine) -> ExpertLoadSummary | None:
    """The real router's per-step expert-rank imbalance since the last run (functional runs of
    an expert-parallel MoE model; None otherwise), then reset for the next run."""
    if engine.args.mode != "functional" or not (engine.sharded and engine.plan.ep > 1):
        return None
    from parallel.tensor import ShardedModel

    model = engine.functional_model
    if not isinstance(model, ShardedModel) or model.expert_load is None:
        return None
    return model.expert_load.take_summary()


def build_memory_plan(engine: Engine, kv_dtype: str | None) -> MemoryPlan:
    """One GPU's memory (the binding pipeline stage's when the plan splits the model)."""
    args, quant = engine.args, engine.quantization
    memory = plan_gpu_memory(
        engine.plan, engine.model_config, engine.hardware,
        dtype=engine.timing_dtype if quant is None else quant.weight_format,
        kv_cache_dtype=kv_dtype or (None if quant is None else engine.cost_model.act_dtype),
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=engine.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        block_size=args.block_size,
    )
    if quant is not None:  # scale bytes counted; 16-bit embedding, head, norms
        from sim.timing.quantization import quantized_memory_plan

        memory = quantized_memory_plan(memory, engine.model_config, quant, engine.plan.tp,
                                       engine.plan.pp)
    spec = args.speculative_config
    draft = None if spec is None else draft_model_shape(spec, engine.model_config)
    if spec is not None and draft is not None:  # the draft's weights and KV share the pool
        memory = with_draft(memory, draft, dtype=engine.timing_dtype,
                            draft_tensor_parallel_size=draft_tp(spec, engine.plan.tp))
    return memory


def build_draft_cost(engine: Engine) -> Pricer | None:
    """The speculative draft model's pricer: None without a draft model (n-gram lookup is
    free); on one GPU when the target is, or when `draft_tensor_parallel_size=1` puts it on
    one rank of the TP group (no collectives); else sharded over the TP group like the target,
    its all-reduces priced by the same collective implementation (as vLLM runs a draft by
    default, `draft_tensor_parallel_size` = the target's)."""
    spec = engine.args.speculative_config
    draft = None if spec is None else draft_model_shape(spec, engine.model_config)
    if spec is None or draft is None:
        return None
    dtp = draft_tp(spec, engine.plan.tp)
    if dtp == 1:
        return CostModel(draft, engine.hardware, dtype=engine.timing_dtype)
    from parallel.collectives import CommMode
    from parallel.cost import ParallelCostModel
    from parallel.plan import ParallelPlan

    mode = CommMode.from_flags(engine.args.enforce_eager, engine.args.disable_custom_all_reduce)
    return ParallelCostModel(draft, engine.hardware, ParallelPlan.from_args(dtp, 1, 1, False),
                             dtype=engine.timing_dtype, comm_mode=mode)


def build_functional(engine: Engine) -> tuple[Any, Any, frozenset[int], str]:
    """The functional model (quantized, then sharded, as asked), its tokenizer, EOS ids and a
    description for the report header."""
    from sim.model.proxy import load_functional_model

    args = engine.args
    model, tokenizer = load_functional_model(args.functional_model or args.model,
                                             dtype=args.functional_dtype, tokenizer=args.tokenizer)
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
        quant = engine.quantization
        tag_activation_quant(model, None if quant is None else quant.act_format)
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
    eviction = a.eviction()
    if eviction is not None:
        text += f", kv_eviction={a.kv_eviction} (budget {eviction.budget})"
    return text


def check_pool_size(engine: Engine, num_gpu_blocks: int) -> None:
    """Refuse a KV pool that no GPU holds: more blocks than the whole device memory
    (`num_gpu_blocks_override` given in tokens or bytes, say). The pools are lazy
    (`cache.block_pool`), so a large one that fits costs no host memory up front."""
    args = engine.args
    block_bytes = engine.kv_block_bytes
    pool_bytes = num_gpu_blocks * block_bytes
    if args.num_gpu_blocks_override is not None and pool_bytes > engine.hardware.mem_bytes:
        raise ConfigError(
            f"num_gpu_blocks_override={args.num_gpu_blocks_override:,} blocks of "
            f"{block_bytes / 2**20:.3g} MiB is {pool_bytes / 2**30:,.1f} GiB of KV, more than "
            f"the {engine.hardware.mem_bytes / 2**30:,.0f} GiB of one {engine.hardware.name}; "
            f"it counts blocks of block_size={args.block_size} tokens (the plan leaves "
            f"{engine.memory.num_kv_blocks:,})")


def build_kv_manager(engine: Engine, num_blocks: int | None = None) -> KVCacheManager:
    """A fresh KV manager for one lane of `engine`, as `kv_cache` asks: `num_blocks` blocks of
    `block_size` tokens (default: the engine's pool, `num_gpu_blocks_override` or the memory
    plan's), whether paged or one contiguous reservation per request.

    Public for tests that drive a scheduler step by step (vLLM builds its test schedulers the same
    way, `tests/v1/core/utils.py:create_scheduler`); a pool smaller than `max_model_len` is
    allowed here, unlike for the engine itself, so preemption can be provoked in a few steps.
    """
    args = engine.args
    if num_blocks is not None and num_blocks < 0:
        raise ConfigError(f"num_blocks must be >= 0, got {num_blocks}")
    if args.kv_cache == "none":
        if num_blocks is not None:
            raise ConfigError(f"num_blocks={num_blocks} with kv_cache='none': this engine keeps "
                              "no KV; drop num_blocks or choose kv_cache='paged'/'contiguous'")
        return KV_CACHES["none"]()
    if args.kv_cache == "paged":
        num_gpu_blocks = engine.num_kv_blocks if num_blocks is None else num_blocks
        num_swap_blocks = int(args.swap_space * 2**30 // engine.kv_block_bytes)
        check_pool_size(engine, num_gpu_blocks)
        paged = PagedKVCache(
            num_gpu_blocks, args.block_size,
            enable_prefix_caching=args.enable_prefix_caching,
            preemption_mode=args.preemption_mode,
            num_swap_blocks=num_swap_blocks,
            eviction=args.eviction())
        paged.record_block_ops = args.mode == "functional"
        # timing-only: no store reads block ids, so the pool hands them out in bulk
        paged.pool.lowest_first = paged.record_block_ops
        return paged
    # (the engine's own token count by default: a pipeline lane's share is counted in tokens)
    num_tokens = engine.num_kv_tokens if num_blocks is None else num_blocks * args.block_size
    return KV_CACHES[args.kv_cache](num_tokens, engine.max_model_len, args.contiguous_reservation)


def build_scheduler(engine: Engine, kv: KVCacheManager) -> Scheduler:
    """A fresh scheduler of `engine`'s kind over `kv`, with the engine's limits, stop criteria
    and the options its kind takes (`batching.SCHEDULER_OPTIONS`). Public for tests, as
    `build_kv_manager`. With speculative decoding (continuous only, refused otherwise by
    `speculative.decoding.Speculation`) it asks the engine's speculation for draft counts,
    whose counters start afresh for the run."""
    # stop strings decode with the tokenizer `LLM` decodes outputs with (bytes when none)
    tokenizer = engine.tokenizer or (ByteTokenizer() if engine.args.mode == "functional" else None)
    stop = StopCriteria(engine.eos_token_ids, engine.max_model_len, tokenizer)
    name = engine.args.scheduler
    options = {key: getattr(engine.args, key) for key in SCHEDULER_OPTIONS[name]}
    if engine.speculation is not None:
        engine.speculation.reset()
        options["speculation"] = engine.speculation
    return SCHEDULERS[name](kv, stop, engine.args.max_num_seqs, engine.max_num_batched_tokens,
                            **options)


def build_executor(engine: Engine, kv: KVCacheManager) -> Executor:
    """The one place every executor is built, for a replica whose lanes use managers like `kv`:
    timing-only (with speculation: acceptance drawn per step), or the one functional executor
    over the store the manager calls for (paged in `kv`'s blocks, else contiguous; per GPU when
    sharded), with the KV codec, KV eviction and speculation applied alike to every layout."""
    args = engine.args
    speculation = engine.speculation
    if args.mode == "timing":
        if speculation is None:
            return TimingExecutor()
        from speculative.executor import SpeculativeTimingExecutor

        return SpeculativeTimingExecutor(speculation.acceptance(), on_release=speculation.release)
    from sim.executor.functional import ExecutorStore, NumpyExecutor, make_kv_store

    model = engine.functional_model
    store: ExecutorStore
    if engine.sharded:  # per-GPU contiguous stores (what they cannot hold: sim.engine.compat)
        from parallel.sharded_kv import RankedKVStore
        from parallel.tensor import ShardedModel

        assert isinstance(model, ShardedModel)  # build_functional shards it
        store = RankedKVStore(model, model.dtype)
    else:
        block_size = kv.block_size if isinstance(kv, PagedKVCache) else None
        store = make_kv_store(model, block_size, args.kv_cache_dtype)
    return NumpyExecutor(
        model, store, retains_kv=kv.retains_kv, max_model_len=engine.max_model_len,
        kv_eviction=args.eviction(),
        speculation=(None if speculation is None
                     else speculation.verifier(model.config.n_layer)))
