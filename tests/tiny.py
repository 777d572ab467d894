"""Tiny random transformers models, built from real configs (no network).

Shared by all tests: ``tiny_model("llama")`` returns an fp32 model in eval
mode with random weights; ``save_tiny(arch, dir)`` writes it to disk without a
tokenizer (the bake path must cope with that).
"""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
DEEPSEEK_V3_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)  # tiny MLA widths


def _config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**COMMON, tie_word_embeddings=False)
    if arch == "llama_tied":
        return tf.LlamaConfig(**COMMON, tie_word_embeddings=True)
    if arch == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=False)
    if arch == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False)
    if arch == "gemma":
        return tf.GemmaConfig(**COMMON, head_dim=16)
    if arch == "gemma2":
        return tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
    if arch == "phi3":
        return tf.Phi3Config(**COMMON, pad_token_id=0, tie_word_embeddings=False)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt_neox":  # parallel residual (Pythia), LayerNorms with biases; lm_head is embed_out under 4.x
        return tf.GPTNeoXConfig(**{k: v for k, v in COMMON.items() if k != "num_key_value_heads"}, **ids)
    if arch == "olmo2":  # norms after the sublayers, q/k norms
        return tf.Olmo2Config(**COMMON, **ids)
    if arch == "granite":  # Llama layout with multipliers
        return tf.GraniteConfig(**COMMON, **ids, embedding_multiplier=2.0, residual_multiplier=0.5,
                                attention_multiplier=0.2, logits_scaling=4.0)
    if arch == "phi":  # one LayerNorm feeds attention and MLP in parallel; every linear has a bias
        return tf.PhiConfig(**COMMON, **ids)
    if arch == "starcoder2":  # LayerNorms with biases; use_bias (on) gives every linear but lm_head a bias
        return tf.Starcoder2Config(**COMMON, **ids, tie_word_embeddings=False)
    if arch == "smollm3":  # Llama layout, no RoPE in every 4th layer
        return tf.SmolLM3Config(**COMMON, **ids, tie_word_embeddings=False)
    if arch == "stablelm":  # LayerNorms with biases; use_qkv_bias (off) gives q/k/v biases
        return tf.StableLmConfig(**COMMON, **ids)
    if arch == "cohere":  # one bias-free LayerNorm feeds attention and MLP in parallel; logit_scale
        return tf.CohereConfig(**COMMON, **ids, tie_word_embeddings=False)
    moe = dict(COMMON, intermediate_size=32)
    if arch == "gpt_oss":  # router and expert biases; experts fused 3-D [E, in, out] under both majors
        return tf.GptOssConfig(**moe, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention"])
    if arch == "mixtral":  # no router or expert bias; experts per module under 4.x, fused 3-D under 5.x
        return tf.MixtralConfig(**moe, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if arch == "qwen2_moe":  # a shared expert with its own sigmoid gate beside the routed experts; q/k/v biases
        return tf.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=32)
    if arch == "olmoe":  # q/k norms over the whole projection
        return tf.OlmoeConfig(**moe, **ids, num_experts=4, num_experts_per_tok=2)
    if arch == "granitemoe":  # Granite multipliers; MoE modules named differently under 4.x and 5.x
        return tf.GraniteMoeConfig(**moe, **ids, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0,
                                   residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0)
    if arch in ("deepseek_v3", "deepseek_v3_no_q_lora"):  # MLA attention (low-rank q and kv, each with its own
        # RMSNorm; every head has its own key and value); the first layer is a dense MLP, the other MoE with a shared
        # expert and a bias-free router
        return tf.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, **DEEPSEEK_V3_MLA,
                                   q_lora_rank=None if arch.endswith("no_q_lora") else 32, n_routed_experts=4,
                                   num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32,
                                   n_shared_experts=1, first_k_dense_replace=1, tie_word_embeddings=False)
    raise ValueError(f"no tiny config for {arch!r}")


# tests/test_moe_archs.py
MOE_ARCHS = ["gpt_oss", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "granitemoe", "deepseek_v3"]
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2", "phi3", "gpt_neox", "olmo2",
         "granite", "phi", "starcoder2", "smollm3", "stablelm", "cohere"]


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _config(arch)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    # Random norm weights: a fresh model has w=1 (or 0 for Gemma), which would
    # hide a wrong fold convention.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: zero in a fresh model, it ranks experts
                b.add_(0.2 * torch.randn_like(b))
    return model.eval()


def save_tiny(arch: str, path, seed: int = 0):
    model = tiny_model(arch, seed)
    model.save_pretrained(path)
    return model


def module_output(model, site: str, ids, *, before_hooks: bool = False):
    """The output of module ``site`` on ``ids``, recorded by a forward hook: after any steering hook
    already attached, or before them all with ``before_hooks`` (the module's own output)."""
    got = {}
    h = model.get_submodule(site).register_forward_hook(lambda m, i, o: got.__setitem__("y", o.clone()),
                                                        prepend=before_hooks)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    return got["y"]


def random_ids(batch: int = 2, length: int = 12, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)
