//! The transformers tensor names and shapes of a Llama checkpoint, in checkpoint order
//! (fixtures README §2.2). The loader, the dummy-weight generator and the synthetic
//! checkpoint writer all walk this one list.

use crate::ModelConfig;

/// What a tensor is, for dummy initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TensorRole {
    Embedding,
    Norm,
    Linear,
}

pub(crate) fn embed() -> String {
    "model.embed_tokens.weight".to_owned()
}
pub(crate) fn final_norm() -> String {
    "model.norm.weight".to_owned()
}
pub(crate) fn lm_head() -> String {
    "lm_head.weight".to_owned()
}
pub(crate) fn layer(i: usize, leaf: &str) -> String {
    format!("model.layers.{i}.{leaf}.weight")
}

/// Every tensor of the checkpoint (without `lm_head` when embeddings are tied).
pub(crate) fn checkpoint_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>, TensorRole)> {
    let h = config.hidden_size;
    let (q, kv, inter) = (config.q_dim(), config.kv_dim(), config.intermediate_size);
    let mut out = vec![(embed(), vec![config.vocab_size, h], TensorRole::Embedding)];
    for i in 0..config.num_hidden_layers {
        out.extend([
            (layer(i, "input_layernorm"), vec![h], TensorRole::Norm),
            (layer(i, "self_attn.q_proj"), vec![q, h], TensorRole::Linear),
            (
                layer(i, "self_attn.k_proj"),
                vec![kv, h],
                TensorRole::Linear,
            ),
            (
                layer(i, "self_attn.v_proj"),
                vec![kv, h],
                TensorRole::Linear,
            ),
            (layer(i, "self_attn.o_proj"), vec![h, q], TensorRole::Linear),
            (
                layer(i, "post_attention_layernorm"),
                vec![h],
                TensorRole::Norm,
            ),
            (
                layer(i, "mlp.gate_proj"),
                vec![inter, h],
                TensorRole::Linear,
            ),
            (layer(i, "mlp.up_proj"), vec![inter, h], TensorRole::Linear),
            (
                layer(i, "mlp.down_proj"),
                vec![h, inter],
                TensorRole::Linear,
            ),
        ]);
    }
    out.push((final_norm(), vec![h], TensorRole::Norm));
    if !config.tie_word_embeddings {
        out.push((lm_head(), vec![config.vocab_size, h], TensorRole::Linear));
    }
    out
}
