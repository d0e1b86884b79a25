"""``MHA2MLAForCausalLM`` for vLLM: a Llama-style decoder whose attention is vLLM's MLA.

Built the way vLLM's own ``llama.py`` and ``deepseek_v2.py`` are: parallel linear layers
(heads split across tensor-parallel ranks, the latent projection replicated), fused
residual RMSNorm, pipeline-parallel support and ``load_weights``. The attention computes
compact projections, applies this checkpoint's per-kv-head partial RoPE, lays the result out
as vLLM's ``[latent | k_pe]`` MLA inputs (see ``conversion.mla_format.layout``), and calls vLLM's
``MLAAttention``, which owns the paged latent cache and the backends.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import MLAAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from conversion.errors import ConversionError
from conversion.mla_format.inputs import mla_inputs
from conversion.mla_format.layout import MLALayout
from conversion.mla_format.spec import MHA2MLASpec
from conversion.validate import check_checkpoint
from vllm_mha2mla.backend_selection import (
    cache_row_layout,
    check_cache_dtype,
    load_class,
    native_cache_sizes,
    plugin_backend_class_path,
    plugin_backend_wanted,
    plugin_prefill_kwargs,
)
from vllm_mha2mla.patches import require_per_layer_kv_cache

logger = init_logger("vllm.mha2mla")  # under "vllm": vLLM's logging configuration prints it
BACKEND_LOG = "MHA2MLA attention backend: %s, cache row %d values"
"""Logged once per process: which kernels serve the layers (``mha2mla bench`` reads it back)."""


def select_attention_backend(layout: MLALayout, vllm_config: VllmConfig, per_layer: bool = False) -> type | None:
    """None to let vLLM pick its own MLA kernels (native shapes), else the plugin's backend.

    The plugin's backend serves any shape; it is used when vLLM's kernels on this platform
    refuse the shape, when the user asks for it with ``--attention-backend CUSTOM``, and for
    every layer of a checkpoint whose layers have different latent widths. A ``--kv-cache-dtype``
    the chosen kernels cannot serve for this shape is refused here (:func:`check_cache_dtype`).
    """
    if not plugin_backend_wanted(layout, vllm_config, per_layer):
        check_cache_dtype(layout, None, vllm_config)
        return None
    path = plugin_backend_class_path()
    if path is None:
        dims = (layout.qk_nope_head_dim, layout.qk_rope_head_dim, layout.v_head_dim)
        raise ValueError(
            f"this MHA2MLA checkpoint caches {layout.cache_values} values per token with MLA dims "
            f"(qk_nope, qk_rope, v) = {dims}, which vLLM's MLA kernels here do not serve (head sizes "
            f"{native_cache_sizes()}) and this plugin has no backend for on this platform. "
            f"Convert it again with `mha2mla convert ... --kv-budget {native_cache_sizes()[0]}`."
        )
    backend = load_class(path)
    check_cache_dtype(layout, backend, vllm_config)
    return backend


def default_device() -> torch.device:
    """The device tensors are created on right now (vLLM builds models under a device
    context manager, and buffers must live where the weights will)."""
    return torch.empty(0).device


def _check_checkpoint_folder(vllm_config: VllmConfig) -> None:
    """Refuses a checkpoint whose tensors disagree with its config before any weight loads, with
    the tensors or fields named (vLLM's loaders would fail later on an anonymous shape assertion)."""
    folder = Path(vllm_config.model_config.model)
    if vllm_config.load_config.load_format == "dummy" or not (folder / "config.json").is_file():
        return
    try:
        check_checkpoint(folder)
    except ConversionError as exc:
        raise ValueError(f"MHA2MLA checkpoint check failed: {exc}") from None


class MHA2MLAAttention(nn.Module):
    def __init__(
        self,
        config,
        spec: MHA2MLASpec,
        vllm_config: VllmConfig,
        prefix: str,
    ) -> None:
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        super().__init__()
        layer_idx = extract_layer_index(prefix)
        lay = spec.layer_layout(layer_idx)
        self.layout = lay
        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        if lay.num_heads % tp_size:
            raise ValueError(f"{lay.num_heads} attention heads do not split over tensor parallel size {tp_size}")
        self.num_local_heads = lay.num_heads // tp_size
        hidden = config.hidden_size
        self.q_proj = ColumnParallelLinear(hidden, lay.compact_q_dim, bias=spec.q_bias,
                                           quant_config=quant_config, prefix=f"{prefix}.q_proj")
        # The latent and the rotary keys are shared by all heads: replicated, as in DeepSeek.
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, lay.compact_kv_dim, bias=spec.kv_a_bias,
                                                   quant_config=quant_config, prefix=f"{prefix}.kv_a_proj_with_mqa")
        self.kv_b_proj = ColumnParallelLinear(lay.kv_lora_rank, lay.num_heads * (lay.qk_nope_head_dim + lay.v_head_dim),
                                              bias=False, quant_config=quant_config, prefix=f"{prefix}.kv_b_proj")
        self.o_proj = RowParallelLinear(lay.num_heads * lay.head_dim, hidden, bias=spec.o_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        start, end = tp_rank * self.num_local_heads, (tp_rank + 1) * self.num_local_heads
        device = default_device()
        constants = spec.input_constants(layer_idx, start, end)
        for name, tensor in zip(("inv_freq_q", "inv_freq_k", "q_index", "kv_index"), constants):
            self.register_buffer(name, tensor.to(device), persistent=False)
        backend = select_attention_backend(lay, vllm_config, spec.per_layer)
        extra = plugin_prefill_kwargs(vllm_config) if backend is not None else {}
        row_layout = cache_row_layout(lay, cache_config.cache_dtype) if backend is not None else None
        if row_layout is not None:  # a low-bit cache: MLAAttention hands the row layout to the plugin's impl
            extra["cache_row_layout"] = row_layout
        self.mla_attn = MLAAttention(
            num_heads=self.num_local_heads,
            scale=spec.softmax_scale,
            qk_nope_head_dim=lay.qk_nope_head_dim,
            qk_rope_head_dim=lay.qk_rope_head_dim,
            v_head_dim=lay.v_head_dim,
            q_lora_rank=None,
            kv_lora_rank=lay.kv_lora_rank,
            kv_b_proj=self.kv_b_proj,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
            attn_backend=backend,
            **extra,
        )
        chosen = getattr(self.mla_attn, "attn_backend", None)
        logger.info_once(BACKEND_LOG, chosen.get_name() if chosen is not None else "unknown", lay.cache_values)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        q, _ = self.q_proj(hidden_states)
        kv, _ = self.kv_a_proj_with_mqa(hidden_states)
        q, kv = mla_inputs(q, kv, positions, self.inv_freq_q, self.inv_freq_k, self.q_index, self.kv_index,
                           lay.head_dim, lay.rope_dim, lay.latent_width)
        kv_c, k_pe = kv.split([lay.kv_lora_rank, lay.qk_rope_head_dim], dim=-1)
        out = self.mla_attn(q, kv_c.contiguous(), k_pe.unsqueeze(1),
                            output_shape=(hidden_states.shape[0], self.num_local_heads * lay.v_head_dim))
        if lay.v_head_dim != lay.head_dim:  # drop the zero padding of the value heads
            out = out.view(-1, self.num_local_heads, lay.v_head_dim)[..., : lay.head_dim]
            out = out.reshape(-1, self.num_local_heads * lay.head_dim)
        out, _ = self.o_proj(out)
        return out


class MHA2MLADecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        spec = MHA2MLASpec.from_config(config)
        self.self_attn = MHA2MLAAttention(config, spec, vllm_config, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                            hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                            prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class MHA2MLAModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        if get_pp_group().is_first_rank or (config.tie_word_embeddings and get_pp_group().is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                       quant_config=vllm_config.quant_config)
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: MHA2MLADecoderLayer(vllm_config=vllm_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if get_pp_group().is_last_rank \
            else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            assert intermediate_tensors is not None
            hidden_states, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class MHA2MLAForCausalLM(nn.Module, SupportsPP):
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        _check_checkpoint_folder(vllm_config)
        if MHA2MLASpec.from_config(config).per_layer:
            require_per_layer_kv_cache()
        self.model = MHA2MLAModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        stacked = [("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, weight in weights:
            if self.config.tie_word_embeddings and name.startswith("lm_head."):
                continue
            for param_name, shard_name, shard_id in stacked:
                if f".{shard_name}." not in name:
                    continue
                name = name.replace(f".{shard_name}.", f".{param_name}.")
                if is_pp_missing_parameter(name, self):
                    break
                param = params[name]
                param.weight_loader(param, weight, shard_id)
                loaded.add(name)
                break
            else:
                if is_pp_missing_parameter(name, self):
                    continue
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no parameter in MHA2MLAForCausalLM")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, weight)
                loaded.add(name)
        return loaded
