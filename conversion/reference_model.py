"""PyTorch reference model of a converted checkpoint, in Hugging Face ``transformers`` style.

It computes attention through the latent exactly as vLLM's MLA does (same padded tensor
layout, same ``kv_b_proj``), caches only ``[latent | rotated rope keys]`` per token, and
trains: it is what fine-tuning updates and what the vLLM plugin is checked against. Since
every weight, including the zero padding, is a real parameter of vLLM's function, a
fine-tuned model stays servable as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV2Config, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from conversion.mla_format.cache_quant import CacheQuant, fake_quantize_row
from conversion.mla_format.inputs import distinct_zero_index, mla_inputs
from conversion.mla_format.spec import MHA2MLASpec


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MHA2MLAAttention(nn.Module):
    """Attention over a cached ``[latent | k_pe]`` row per token (one MQA "head")."""

    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.spec = MHA2MLASpec.from_config(config)
        self.layer_idx = layer_idx
        lay = self.spec.layer_layout(layer_idx)
        self.layout = lay
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, lay.compact_q_dim, bias=self.spec.q_bias)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, lay.compact_kv_dim, bias=self.spec.kv_a_bias)
        self.kv_b_proj = nn.Linear(
            lay.kv_lora_rank, lay.num_heads * (lay.qk_nope_head_dim + lay.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(lay.num_heads * lay.head_dim, hidden, bias=self.spec.o_bias)
        # Derived from the config, not state: plain attributes (not buffers), so that
        # transformers' meta-device loading never leaves them uninitialised.
        self._constants: dict[torch.device, tuple[tuple[torch.Tensor, ...], int, int]] = {}
        self.cache_quant: CacheQuant | None = None
        """A low-bit cache format (:func:`set_cache_quant`): every row is attended as that cache returns it."""

    def constants(self, device: torch.device) -> tuple:
        """The constant arguments of ``mla_inputs`` for this layer on ``device``: frequencies,
        gather indices with a distinct zero per padding position (fast gradients), and the
        counts of those zeros."""
        if device not in self._constants:
            inv_q, inv_k, q_index, kv_index = self.spec.input_constants(self.layer_idx)
            lay = self.layout
            q_index, q_zeros = distinct_zero_index(q_index, lay.compact_q_dim)
            kv_index, kv_zeros = distinct_zero_index(kv_index, lay.compact_kv_dim)
            tensors = tuple(t.to(device) for t in (inv_q, inv_k, q_index, kv_index))
            self._constants[device] = (tensors, q_zeros, kv_zeros)
        return self._constants[device]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        lay = self.layout
        bsz, q_len, _ = hidden_states.shape
        tensors, q_zeros, kv_zeros = self.constants(hidden_states.device)
        q, kv = mla_inputs(
            self.q_proj(hidden_states),
            self.kv_a_proj_with_mqa(hidden_states),
            position_ids,
            *tensors,
            lay.head_dim,
            lay.rope_dim,
            lay.latent_width,
            q_zeros,
            kv_zeros,
        )
        latent, k_pe = kv[..., : lay.kv_lora_rank], kv[..., lay.kv_lora_rank :]
        if self.cache_quant is not None:
            latent, k_pe = self._read_as_cached(latent, k_pe)
        if past_key_values is not None:
            # The cache holds exactly what vLLM pages: the latent and the rotated rope keys.
            latent, k_pe = past_key_values.update(latent[:, None], k_pe[:, None], self.layer_idx)
            latent, k_pe = latent[:, 0], k_pe[:, 0]
        kv_len = latent.shape[1]
        kvb = self.kv_b_proj(latent).view(bsz, kv_len, lay.num_heads, -1)
        k_nope, value = kvb.split([lay.qk_nope_head_dim, lay.v_head_dim], dim=-1)
        key = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, lay.num_heads, -1)], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attn_mask=attention_mask,
            is_causal=attention_mask is None and q_len > 1,  # no mask: plain causal (fused kernels)
            scale=self.spec.softmax_scale,
        )
        out = out.transpose(1, 2)[..., : lay.head_dim].reshape(bsz, q_len, -1)
        return self.o_proj(out)


    def _read_as_cached(self, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The row as a :attr:`cache_quant` cache stores it: the SVD latent (the first ``latent_width``
        columns) in its format's latent bits, the rotary keys (the latent part's tail, then ``k_pe``) in its
        rope bits. Every row, the current token's too: what a decode step reads (vLLM's prefill attends to
        the chunk's own rows before they are cached, so this is the conservative side)."""
        width = self.layout.latent_width
        rope = torch.cat([latent[..., width:], k_pe], dim=-1)
        latent_read, rope_read = fake_quantize_row(latent[..., :width], rope, self.cache_quant)
        tail = latent.shape[-1] - width
        return torch.cat([latent_read, rope_read[..., :tail]], dim=-1), rope_read[..., tail:]


class MHA2MLADecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.self_attn = MHA2MLAAttention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, position_ids, attention_mask, past_key_values=None):
        residual = hidden_states
        hidden_states = residual + self.self_attn(
            self.input_layernorm(hidden_states), position_ids, attention_mask, past_key_values
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MHA2MLAPreTrainedModel(PreTrainedModel):
    config_class = DeepseekV2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MHA2MLADecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def build_attention_mask(
    attention_mask: torch.Tensor | None, bsz: int, q_len: int, past_len: int, device: torch.device
) -> torch.Tensor:
    """Boolean ``[B, 1, q_len, past_len + q_len]`` mask: causal and (optionally) padding.

    Each query always sees itself, so fully padded rows (left padding) stay finite.
    """
    kv_len = past_len + q_len
    key_pos = torch.arange(kv_len, device=device)[None, :]
    query_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    mask = (key_pos <= query_pos)[None, None].expand(bsz, 1, q_len, kv_len)
    if attention_mask is not None:
        padding = attention_mask[:, None, None, -kv_len:].to(torch.bool)
        mask = (mask & padding) | (key_pos == query_pos)[None, None]
    return mask


class MHA2MLAModel(MHA2MLAPreTrainedModel):
    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [MHA2MLADecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        bsz, q_len, _ = inputs_embeds.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -q_len:]
            else:
                position_ids = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device)
                position_ids = position_ids[None].expand(bsz, -1)
        # Without padding or a cache, attention is plainly causal: no mask tensor, so SDPA can
        # take its fused causal kernels (training throughput).
        mask = None
        if attention_mask is not None or past_len > 0:
            mask = build_attention_mask(attention_mask, bsz, q_len, past_len, inputs_embeds.device)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, position_ids, mask, past_key_values if use_cache else None)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden), past_key_values=past_key_values if use_cache else None
        )


class MHA2MLAForCausalLM(MHA2MLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.model = MHA2MLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        skip_logits: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """As Hugging Face causal LMs; ``skip_logits=True`` returns the final (normed) hidden
        states in ``hidden_states`` and no logits, for losses that project in chunks."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if skip_logits:
            return CausalLMOutputWithPast(hidden_states=(hidden,), past_key_values=out.past_key_values)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    @torch.no_grad()
    def greedy_generate(self, input_ids: torch.LongTensor, max_new_tokens: int) -> torch.LongTensor:
        """Greedy decoding with the latent cache (one sequence per row, no padding).

        A plain loop rather than ``generate()`` so parity tests do not depend on the
        generation utilities of a particular transformers release.
        """
        cache = DynamicCache()
        out = self(input_ids=input_ids, past_key_values=cache, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(max_new_tokens - 1):
            out = self(input_ids=tokens[-1][:, None], past_key_values=cache, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1))
        return torch.stack(tokens, dim=1)


def set_cache_quant(model: MHA2MLAForCausalLM, fmt: CacheQuant | None) -> MHA2MLAForCausalLM:
    """Makes every attention layer read its rows as a ``fmt`` low-bit cache would return them (``None``:
    the model's dtype again). For quality studies of a cache format and as the reference its kernels match."""
    for module in model.modules():
        if isinstance(module, MHA2MLAAttention):
            module.cache_quant = fmt
    return model


def load_reference(path, dtype: torch.dtype = torch.float32) -> MHA2MLAForCausalLM:
    """Loads a converted checkpoint folder as the PyTorch reference model (eval mode)."""
    model = MHA2MLAForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.eval()
