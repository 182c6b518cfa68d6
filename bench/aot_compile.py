"""Every Triton kernel compiled ahead of time for Hopper (sm_90a) at the launches the engine makes for Llama-2-7B,
on a machine without a GPU, with each compiled kernel's registers, spills and shared memory.

    python bench/aot_compile.py            # writes bench/results/aot-sm90-triton<version>.{json,md}
    python bench/aot_compile.py --only "tiny model" --out /tmp/aot   # some scenarios only, written elsewhere

How: a one-layer Llama-2-7B-shaped model (hidden 4096, 32 heads x 128, intermediate 11008, vocab 32016) is built
on the meta device, and the engine's own code runs it with the Triton backend: the decode forward of every CUDA
graph the engine captures, eager decode and cascade (forked Self-RAG branches) decode steps, chunked prefills,
passages over a cached prompt, and the sampler with and without the reflection groups and at every top-n, for
fp16 and bf16 activations with fp16 and FP8 weights, batches 1, 5 and 16 and contexts 512 and 4096, block 16;
and the embedded tiny model (head_dim 48, its attention tiles padded to 64) decoding and prefilling in fp16.
Inside `planning_for(H100)` the launch functions in kernels/ choose their configurations for an H100's 132 SMs
and compute capability 9.0, and triton's launch is replaced by its warm-up: it compiles with the JIT's own
argument specialization, for a stand-in driver that reports sm_90a, and returns without launching. The autotuned
GEMM compiles every candidate. So what is compiled is what those launch functions would launch (the FP8 decode
GEMVs with their RMSNorm and SiLU-and-mul prologues included); no list of configurations is kept here. Registers and spills are those the ptxas bundled with triton reports for the
cubin it builds; shared memory is triton's own allocation.

Exits 1 on a compile error, on shared memory over sm_90's 227 KiB per block, or on spills in a kernel that a
decode step launches (graphs, eager or cascade decode, the sampler): decode is where every step pays for them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

# Compiled, not interpreted; and a fresh cache, so that ptxas runs (and reports) for every kernel and nothing is
# kept outside the repository. Both before triton or a kernel module is imported.
os.environ.pop("TRITON_INTERPRET", None)
# `--cache-dir DIR` keeps the cache instead, e.g. `.triton-cache` for a GPU session to carry (gpu_session.sh uses
# it when present); read here, before triton is imported, as the cache directory is.
_KEEP = sys.argv[sys.argv.index("--cache-dir") + 1] if "--cache-dir" in sys.argv[:-1] else None
_CACHE_DIR = os.path.abspath(_KEEP) if _KEEP else tempfile.mkdtemp(prefix="selfrag-aot-triton-cache-")
if _KEEP:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)  # fresh, so that ptxas runs and reports for every kernel
os.environ["TRITON_CACHE_DIR"] = _CACHE_DIR
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import LLAMA2_7B  # noqa: E402
from selfrag_engine.backend import TRITON  # noqa: E402
from selfrag_engine.config import LlamaConfig  # noqa: E402
from selfrag_engine.engine.cuda_graph import DecodeGraphs  # noqa: E402
from selfrag_engine.engine.llm_engine import Engine  # noqa: E402
from selfrag_engine.engine.model_runner import cascade_metadata, decode_metadata  # noqa: E402
from selfrag_engine.engine.prefix_groups import shared_prefix_groups  # noqa: E402
from selfrag_engine.kernels import H100, planning_for  # noqa: E402
from selfrag_engine.kernels.activation import silu_and_mul  # noqa: E402
from selfrag_engine.kernels.sampling import MAX_TOP_N  # noqa: E402
from selfrag_engine.layers.attention import FP8_KV_DTYPE, AttentionMetadata, KVCache  # noqa: E402
from selfrag_engine.layers.fp8_linear import replace_linears_with_fp8  # noqa: E402
from selfrag_engine.layers.penalties import apply_penalties  # noqa: E402
from selfrag_engine.layers.sampler import ReflectionGroups, sample  # noqa: E402
from selfrag_engine.models.llama import Llama  # noqa: E402
from selfrag_engine.tiny.assets import default_model_dir  # noqa: E402
from selfrag_engine.vocab import ADDED_TOKENS, GROUPS  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET = GPUTarget("cuda", 90, 32)
# cudaDevAttrMaxSharedMemoryPerBlockOptin of sm_90: 227 KiB.
SM90_MAX_SHARED = 232448
BATCHES = (1, 5, 16)
CONTEXTS = (512, 4096)
BLOCK_SIZE = 16
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PASSAGE_TOKENS = 150  # a retrieved passage of the Self-RAG short form, prefilled over the cached prompt
SHORT_PROMPTS = (16, 32, 64)  # prompts (or last chunks) short enough for the smaller prefill tiles


def _engine_default(name: str):
    """An Engine option's default, read from its signature so that this script follows it."""
    import inspect
    return inspect.signature(Engine.__init__).parameters[name].default


class _StandInDriver:
    """What triton's JIT asks of a driver to compile: the target, a device and a stream; never used to launch."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")


@dataclass
class Compiled:
    """One compiled kernel: what was compiled, its resources, and every launch that asked for it."""
    kernel: str
    config: dict
    dtypes: dict
    specialized: list[str]  # integer arguments the JIT specialized on: "name=1" or "name%16" (a multiple of 16)
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    warps: int
    stages: int
    launched_by: list[str] = field(default_factory=list)
    decode_path: bool = False


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _parse_ptxas(log: str, name: str) -> tuple[int, int, int, int]:
    """(registers, spill stores, spill loads, stack frame bytes) of entry `name` in a ptxas -v log."""
    start = log.find(f"Compiling entry function '{name}'")
    if start < 0:
        raise RuntimeError(f"no ptxas report for {name} in:\n{log}")
    part = log[start:]
    regs, frame = _PTXAS_REGS.search(part), _PTXAS_FRAME.search(part)
    if regs is None or frame is None:
        raise RuntimeError(f"unreadable ptxas report for {name}:\n{part}")
    return int(regs.group(1)), int(frame.group(2)), int(frame.group(3)), int(frame.group(1))


def _specialization(src, params) -> list[str]:
    """The integer arguments the JIT specialized on, from the source it compiled (signature, attributes)."""
    out = []
    for i, p in enumerate(params):
        kind = src.signature.get(p.name, "")
        if p.is_constexpr or kind.startswith("*"):
            continue
        if kind == "constexpr":
            out.append(f"{p.name}={src.constants.get((i,))}")
        elif ["tt.divisibility", 16] in src.attrs.get((i,), []):
            out.append(f"{p.name}%16")
    return out


def _short(value) -> object:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


class Recorder:
    """Compiles what the launch functions launch, while `scenario` names the launches."""

    def __init__(self) -> None:
        self.compiled: dict[int, Compiled] = {}
        self.keep: list[object] = []  # the compiled kernels, so that their ids stay unique
        self.failures: list[str] = []
        self.label = ""
        self.decode = False

    @contextlib.contextmanager
    def scenario(self, label: str, decode: bool) -> Iterator[None]:
        self.label, self.decode = label, decode
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every failure is reported, and the run goes on
            self.failures.append(f"{label}: {type(e).__name__}: {e}")
            traceback.print_exc()
        finally:
            self.label = ""

    def compile(self, fn: JITFunction, args: tuple, kwargs: dict, note: str = "") -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            kernel = _ORIGINAL_RUN(fn, *args, grid=None, warmup=True, **kwargs)
        entry = self.compiled.get(id(kernel))
        if entry is None:
            name = kernel.metadata.name
            regs, stores, loads, frame = _parse_ptxas(out.getvalue(), name)
            params = fn.params
            constexprs = {p.name for p in params if p.is_constexpr}
            config = {p.name: _short(a) for p, a in zip(params, args) if p.is_constexpr}
            config.update({k: _short(v) for k, v in kwargs.items() if k in constexprs})
            if getattr(kernel.metadata, "maxnreg", None):
                config["maxnreg"] = kernel.metadata.maxnreg
            dtypes = {p.name: _short(a.dtype) for p, a in zip(params, args) if isinstance(a, torch.Tensor)}
            entry = Compiled(kernel=fn.fn.__name__, config=config, dtypes=dtypes,
                             specialized=_specialization(kernel.src, params), registers=regs,
                             spill_stores=stores, spill_loads=loads, stack_bytes=frame,
                             shared_bytes=int(kernel.metadata.shared), warps=int(kernel.metadata.num_warps),
                             stages=int(kernel.metadata.num_stages))
            self.compiled[id(kernel)] = entry
            self.keep.append(kernel)
        label = self.label + (f" ({note})" if note else "")
        if label not in entry.launched_by:
            entry.launched_by.append(label)
        entry.decode_path |= self.decode


_ORIGINAL_RUN = JITFunction.run
_ORIGINAL_AUTOTUNE = Autotuner.run


@contextlib.contextmanager
def compiling_launches(recorder: Recorder) -> Iterator[None]:
    """Within the block, a launch compiles its kernel for sm_90a instead of running it (an autotuned launch
    compiles every candidate), and the recorder notes it."""

    def run(self, *args, grid, warmup, **kwargs):
        recorder.compile(self, args, kwargs)

    def autotuned(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        for i, config in enumerate(self.configs):
            recorder.compile(self.fn, args, {**kwargs, **config.all_kwargs()},
                             note=f"autotune candidate {i + 1} of {len(self.configs)}")

    driver.set_active(_StandInDriver(TARGET))
    knobs.nvidia.dump_ptxas_log = True
    JITFunction.run, Autotuner.run = run, autotuned
    try:
        with planning_for(H100):
            yield
    finally:
        JITFunction.run, Autotuner.run = _ORIGINAL_RUN, _ORIGINAL_AUTOTUNE
        knobs.nvidia.dump_ptxas_log = False
        driver.set_active(None)  # the default driver again, created when next asked for


# ---- the engine's launches, on meta tensors ------------------------------------------------------------------

META = torch.device("meta")


def build_model(dtype: torch.dtype, fp8: bool, shape: dict = LLAMA2_7B,
                kv_fp8: bool = False) -> tuple[Llama, list[KVCache], LlamaConfig]:
    """One decoder layer of Llama-2-7B (or of `shape`) on the meta device, set to run the Triton kernels; with
    kv_fp8 its pool is float8 e4m3 with per-head scales (kv_cache_dtype="fp8")."""
    config = LlamaConfig.from_dict({**shape, "num_hidden_layers": 1})
    with torch.device(META):
        model = Llama(config)
    model.to(dtype)
    model.init_rope()
    if fp8:
        replace_linears_with_fp8(model)
    model.set_backend(TRITON)
    shape = (4096, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    if kv_fp8:
        scale = torch.empty(config.num_key_value_heads, dtype=torch.float32, device=META)
        kv = [KVCache(torch.empty(shape, dtype=FP8_KV_DTYPE, device=META),
                      torch.empty(shape, dtype=FP8_KV_DTYPE, device=META), scale, scale)]
    else:
        kv = [KVCache(torch.empty(shape, dtype=dtype, device=META), torch.empty(shape, dtype=dtype, device=META))]
    return model.eval(), kv, config


def _tables(context_lens: list[int], groups_of: int = 0) -> np.ndarray:
    """Block tables [B, blocks of the longest row], -1 padded, with distinct blocks per row; with groups_of, rows
    come in groups of that size whose rows share the full blocks of the group's shortest context (forks)."""
    need = [-(-c // BLOCK_SIZE) for c in context_lens]
    tables = np.full((len(context_lens), max(need)), -1, dtype=np.int32)
    nxt = 0
    for g in range(0, len(context_lens), groups_of or 1):
        rows = range(g, min(g + (groups_of or 1), len(context_lens)))
        shared = (min(context_lens[r] for r in rows) - 1) // BLOCK_SIZE if groups_of else 0
        tables[list(rows), :shared] = np.arange(nxt, nxt + shared)
        nxt += shared
        for r in rows:
            tables[r, shared:need[r]] = np.arange(nxt, nxt + need[r] - shared)
            nxt += need[r] - shared
    return tables


def _step(model: Llama, kv: list[KVCache], meta: AttentionMetadata, tokens: int) -> torch.Tensor:
    ids = torch.empty(tokens, dtype=torch.int64, device=META)
    hidden = model(ids, torch.empty(tokens, dtype=torch.int64, device=META), meta, kv)
    return model.compute_logits(hidden)


def decode_step(model: Llama, kv: list[KVCache], context_lens: list[int], groups_of: int = 0) -> None:
    """An eager decode step, laid out as the model runner lays it out; with groups_of, the rows are forks in
    groups of that size, which the runner turns into a cascade decode."""
    batch = len(context_lens)
    tables, cascade = _tables(context_lens, groups_of), None
    if groups_of:
        groups = shared_prefix_groups(tables, context_lens, BLOCK_SIZE)
        if not groups.shares:
            raise RuntimeError("the forked rows share no prefix block")
        tables, context_lens = tables[groups.order], [context_lens[i] for i in groups.order]
        cascade = cascade_metadata(groups, context_lens, BLOCK_SIZE, META)
    meta = decode_metadata(tables, context_lens, np.arange(batch, dtype=np.int64), META, cascade)
    _step(model, kv, meta, batch)
    # Not on the model's path (its MLP multiplies in torch), compiled at the decode shape all the same.
    act = model.model.embed_tokens.weight.dtype
    silu_and_mul(torch.empty(batch, 2 * model.config.intermediate_size, dtype=act, device=META))


def prefill_step(model: Llama, kv: list[KVCache], q_lens: list[int], context_lens: list[int]) -> None:
    tokens = sum(q_lens)
    meta = AttentionMetadata(
        cu_seqlens_q=torch.empty(len(q_lens) + 1, dtype=torch.int32, device=META),
        context_lens=torch.empty(len(q_lens), dtype=torch.int32, device=META),
        block_tables=torch.from_numpy(_tables(context_lens)).to(META),
        slot_mapping=torch.empty(tokens, dtype=torch.int64, device=META),
        max_q_len=max(q_lens), max_context_len=max(context_lens), q_lens_host=list(q_lens),
        context_lens_host=list(context_lens))
    _step(model, kv, meta, tokens)


def prefill_chunks(batch: int, context: int, budget: int) -> list[tuple[list[int], list[int]]]:
    """(new tokens, context) of each row of the steps that prefill `batch` prompts of `context` tokens with at
    most `budget` new tokens a step: as many whole prompts as fit, a longer prompt in chunks of the budget
    (the first and the last one)."""
    if context <= budget:
        rows = min(batch, max(1, budget // context))
        return [([context] * rows, [context] * rows)]
    last = context - (context - 1) // budget * budget
    return [([budget], [budget]), ([last], [context])]


def sampler_step(batch: int, vocab: int, groups: ReflectionGroups | None, top_n: int) -> None:
    f32 = dict(dtype=torch.float32, device=META)
    sample(torch.empty(batch, vocab, **f32), torch.empty(batch, **f32), torch.empty(batch, **f32),
           torch.empty(batch, dtype=torch.int32, device=META), torch.empty(batch, dtype=torch.int64, device=META),
           groups=groups, top_n=top_n, backend=TRITON)


def penalties_step(batch: int, vocab: int) -> None:
    """The logit processing before the sampler: with and without each optional input, and min-p."""
    f32 = dict(dtype=torch.float32, device=META)
    logits, bias = torch.empty(batch, vocab, **f32), torch.empty(batch, vocab, **f32)
    counts = torch.empty(batch, vocab, dtype=torch.int32, device=META)
    seen = torch.empty(batch, vocab, dtype=torch.bool, device=META)
    rows = [torch.empty(batch, **f32) for _ in range(5)]
    apply_penalties(logits, counts, seen, bias, *rows, use_min_p=True, backend=TRITON)
    apply_penalties(logits, None, None, bias, *rows, use_min_p=True, backend=TRITON)
    apply_penalties(logits, counts, seen, None, *rows, use_min_p=False, backend=TRITON)


def reflection_groups(vocab: int) -> ReflectionGroups:
    """The Self-RAG groups with their ids in the published vocabulary: the added tokens last, in their order."""
    first = vocab - len(ADDED_TOKENS)
    ids = {tok: first + i for i, tok in enumerate(ADDED_TOKENS)}
    return ReflectionGroups.from_token_ids({name: [ids[t] for t in toks] for name, toks in GROUPS.items()})


def scenarios() -> Iterator[tuple[str, bool, Callable[[], None]]]:
    """(label, decode path?, the launches) for everything the engine runs at the Llama-2-7B shapes."""
    budget = _engine_default("max_num_batched_tokens")
    graph_batch = min(_engine_default("max_num_seqs"), _engine_default("cuda_graph_max_batch"))
    max_len = LLAMA2_7B["max_position_embeddings"]
    for dname, dtype in DTYPES.items():
        # The FP8 KV cache with FP8 weights only: the attention and KV-store kernels do not see the weights.
        for fp8, kv_fp8 in ((False, False), (True, False), (True, True)):
            tag = f"{dname}/{'fp8' if fp8 else 'fp16'} weights" + (", fp8 KV" if kv_fp8 else "")

            def model(fp8=fp8, kv_fp8=kv_fp8) -> tuple[Llama, list[KVCache], LlamaConfig]:
                return build_model(dtype, fp8, kv_fp8=kv_fp8)

            def graphs(m=model) -> None:
                net, kv, _ = m()
                g = DecodeGraphs(net, kv, graph_batch, max_len, BLOCK_SIZE, META)
                for b in g.sizes:
                    # What DecodeGraphs.capture runs for each batch size of its ladder, outside and in the graph.
                    g._forward(b)

            yield f"CUDA graph decode, batches {graph_batch}-ladder, {tag}", True, graphs
            for b in BATCHES:
                for c in CONTEXTS:
                    def eager(m=model, b=b, c=c) -> None:
                        net, kv, _ = m()
                        decode_step(net, kv, [c] * b)
                        # A table width that is not a multiple of 16 specializes the kernels apart.
                        decode_step(net, kv, [c - BLOCK_SIZE] * b)
                    yield f"eager decode b={b} c={c}, {tag}", True, eager
                    if b > 1:
                        def forked(m=model, b=b, c=c) -> None:
                            net, kv, _ = m()
                            decode_step(net, kv, [c + 1 + i for i in range(b)], groups_of=5)
                        yield f"cascade decode b={b} (branches of 5) c={c}, {tag}", True, forked

                    def prefill(m=model, b=b, c=c) -> None:
                        net, kv, _ = m()
                        for q_lens, ctx in prefill_chunks(b, c, budget):
                            prefill_step(net, kv, q_lens, ctx)
                    yield f"prefill b={b} c={c} ({budget} tokens a step), {tag}", False, prefill
            for c in CONTEXTS:
                def passages(m=model, c=c) -> None:
                    net, kv, _ = m()
                    prefill_step(net, kv, [PASSAGE_TOKENS] * 5, [c] * 5)
                yield f"5 passages of {PASSAGE_TOKENS} tokens over a {c - PASSAGE_TOKENS}-token prompt, {tag}", \
                    False, passages
            for q in SHORT_PROMPTS:
                def short(m=model, q=q) -> None:
                    net, kv, _ = m()
                    prefill_step(net, kv, [q], [q])
                yield f"prefill of a {q}-token prompt, {tag}", False, short
    # The embedded tiny model (head_dim 48: the attention tiles padded to 64), as `make demo`, the server and
    # fp8_accuracy run it on a GPU: fp16 activations, fp16 and FP8 weights.
    tiny = json.loads((default_model_dir() / "config.json").read_text())
    tiny_len = tiny["max_position_embeddings"]
    for fp8 in (False, True):
        tag = f"tiny model (head_dim {tiny['hidden_size'] // tiny['num_attention_heads']}), " \
              f"fp16/{'fp8' if fp8 else 'fp16'} weights"

        def tiny_model(fp8=fp8) -> tuple[Llama, list[KVCache], LlamaConfig]:
            return build_model(torch.float16, fp8, tiny)

        def tiny_decode(m=tiny_model) -> None:
            net, kv, _ = m()
            g = DecodeGraphs(net, kv, graph_batch, tiny_len, BLOCK_SIZE, META)
            for b in g.sizes:
                g._forward(b)
            decode_step(net, kv, [100])
            decode_step(net, kv, [101 + i for i in range(5)], groups_of=5)
        yield f"CUDA graph, eager and cascade decode, {tag}", True, tiny_decode

        def tiny_prefill(m=tiny_model) -> None:
            net, kv, _ = m()
            prefill_step(net, kv, [60], [60])
            prefill_step(net, kv, [40] * 5, [100] * 5)
        yield f"prefill of a prompt and 5 passages, {tag}", False, tiny_prefill

    vocab = LLAMA2_7B["vocab_size"]
    for groups in (None, reflection_groups(vocab)):
        for b in BATCHES:
            def sampler(b=b, groups=groups) -> None:
                for top_n in range(MAX_TOP_N + 1):
                    sampler_step(b, vocab, groups, top_n)
            yield (f"sampler b={b}, fp32 logits, top_n 0-{MAX_TOP_N}, "
                   f"{'reflection groups' if groups else 'no groups'}"), True, sampler
    for b in BATCHES:
        def penalties(b=b) -> None:
            penalties_step(b, vocab)
        yield f"penalties, bias and min-p b={b}, fp32 logits", True, penalties


# ---- report --------------------------------------------------------------------------------------------------

def check(entries: list[Compiled]) -> list[str]:
    problems = []
    for e in entries:
        what = f"{e.kernel} [{_fmt(e.config)}] [{_fmt_dtypes(e.dtypes)}] [{', '.join(e.specialized)}]"
        if e.shared_bytes > SM90_MAX_SHARED:
            problems.append(f"{what}: {e.shared_bytes} bytes of shared memory, over sm_90's {SM90_MAX_SHARED}")
        if e.decode_path and (e.spill_stores or e.spill_loads):
            problems.append(f"{what}: spills on the decode path ({e.spill_stores} bytes stored, "
                            f"{e.spill_loads} loaded)")
    return problems


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _fmt_dtypes(dtypes: dict) -> str:
    """The tensor arguments grouped by dtype: "q, k, v: float16; part_o: float32"."""
    by: dict[str, list[str]] = {}
    for name, dtype in dtypes.items():
        by.setdefault(dtype, []).append(name.removesuffix("_ptr"))
    return "; ".join(f"{', '.join(names)}: {dtype}" for dtype, names in by.items())


def write(entries: list[Compiled], failures: list[str], out_dir: Path) -> Path:
    """The JSON and markdown tables; nothing in them depends on the run's timing, so a rerun that compiles the
    same kernels rewrites the same files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"aot-sm90-triton{triton.__version__}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    doc = {
        "target": "cuda sm_90a (compute capability 9.0, warp 32), launches planned for 132 SMs (H100, H200)",
        "versions": {"triton": triton.__version__, "torch": torch.__version__},
        "command": " ".join(["python", *sys.argv]),
        "model": {k: LLAMA2_7B[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                             "intermediate_size", "vocab_size", "max_position_embeddings")},
        "block_size": BLOCK_SIZE,
        "shared_memory_limit_bytes": SM90_MAX_SHARED,
        "failures": failures,
        "kernels": [e.__dict__ for e in entries],
    }
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Triton kernels compiled for sm_90a, triton {triton.__version__}", "",
             f"`{doc['command']}`: {doc['target']}; Llama-2-7B shapes, block {BLOCK_SIZE}. Registers and spills "
             "as ptxas reports them; shared memory as triton allocates it (limit "
             f"{SM90_MAX_SHARED} bytes). `decode` marks kernels that a decode step launches. "
             f"{len(entries)} compiled kernels, {sum(len(e.launched_by) for e in entries)} launch kinds.", ""]
    lines += ["## Failures", ""] + [f"- {f}" for f in failures] + [""] if failures else ["No failures.", ""]
    lines += ["| kernel | config | dtypes | specialized | registers | spill stores / loads (bytes) | shared (bytes) "
              "| warps | stages | decode | launched by |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        by = "; ".join(e.launched_by[:3]) + (f"; and {len(e.launched_by) - 3} more" if len(e.launched_by) > 3
                                              else "")
        lines.append(f"| {e.kernel} | {_fmt(e.config)} | {_fmt_dtypes(e.dtypes)} | {', '.join(e.specialized)} | "
                     f"{e.registers} | {e.spill_stores} / "
                     f"{e.spill_loads} | {e.shared_bytes} | {e.warps} | {e.stages} | "
                     f"{'yes' if e.decode_path else ''} | {by} |")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default bench/results)")
    ap.add_argument("--only", default=None, metavar="TEXT",
                    help="compile only the scenarios whose label contains TEXT (e.g. 'tiny model'); the tables then "
                         "hold only those, so write them elsewhere with --out")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="keep the Triton cache of the compiled kernels there (emptied first), for a GPU session "
                         "to carry; by default a temporary one, removed at the end")
    args = ap.parse_args(argv)
    recorder = Recorder()
    t0 = time.perf_counter()
    try:
        with compiling_launches(recorder), torch.inference_mode():
            for label, decode, launches in scenarios():
                if args.only and args.only not in label:
                    continue
                before, start = len(recorder.compiled), time.perf_counter()
                with recorder.scenario(label, decode):
                    launches()
                print(f"{time.perf_counter() - start:6.1f} s  {len(recorder.compiled) - before:3d} new  {label}",
                      flush=True)
    finally:
        if not _KEEP:
            shutil.rmtree(_CACHE_DIR, ignore_errors=True)
    seconds = time.perf_counter() - t0
    entries = sorted(recorder.compiled.values(), key=lambda e: (e.kernel, json.dumps(e.config, sort_keys=True),
                                                                  json.dumps(e.dtypes, sort_keys=True),
                                                                  e.specialized))
    failures = recorder.failures + check(entries)
    path = write(entries, failures, args.out)
    print(f"triton {triton.__version__}: {len(entries)} kernels compiled for sm_90a in {seconds:.0f} s; wrote {path}")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
