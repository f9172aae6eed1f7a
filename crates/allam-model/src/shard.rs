//! Megatron-style tensor-parallel sharding: which slice of every weight a rank holds.
//!
//! - q/k/v: column-parallel by heads (rows of the `[out, in]` weights). Rank `r` of `N` holds
//!   query heads `r * n_q / N ..`. KV heads split the same way when `N` divides them; when
//!   `N` exceeds them (and they divide `N`), each rank holds the one KV head its query heads
//!   read (`r * n_kv / N`), replicated over `N / n_kv` ranks.
//! - o_proj, down_proj: row-parallel (columns of `[out, in]`), followed by an all-reduce.
//! - gate/up: column-parallel over the intermediate size.
//! - embedding and lm_head: split over the vocabulary (rows). The embedding lookup yields
//!   zeros outside a rank's slice and is all-reduced; lm_head's logits are all-gathered.
//! - norms: replicated.
//!
//! Invariant: a `ShardPlan` exists only for a config it fits: `N` divides the query heads and
//! divides or is a multiple of the KV heads, and every rank gets at least one row of the
//! vocabulary and the intermediate size. The check runs before any weight is read.

use std::ops::Range;

use allam_backend::{AttentionLayout, Backend};

use crate::{Error, ModelConfig};

/// A rank's place in its tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TpShard {
    pub rank: usize,
    pub world_size: usize,
}

impl Default for TpShard {
    fn default() -> Self {
        TpShard::SINGLE
    }
}

impl TpShard {
    /// No parallelism: rank 0 of 1.
    pub const SINGLE: TpShard = TpShard {
        rank: 0,
        world_size: 1,
    };

    /// The shard a backend's group gives it.
    pub fn of(backend: &dyn Backend) -> TpShard {
        TpShard {
            rank: backend.rank(),
            world_size: backend.world_size().max(1),
        }
    }

    /// This rank's part of `0..total` when split as evenly as possible.
    pub fn split(&self, total: usize) -> Range<usize> {
        let n = self.world_size.max(1);
        (self.rank * total / n)..((self.rank + 1) * total / n)
    }
}

/// The slices one rank loads and the geometry it computes with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ShardPlan {
    pub(crate) shard: TpShard,
    /// Rows of q_proj (query heads × head_dim).
    pub(crate) q_rows: Range<usize>,
    /// Rows of k_proj and v_proj.
    pub(crate) kv_rows: Range<usize>,
    /// Rows of gate/up, columns of down.
    pub(crate) inter: Range<usize>,
    /// Rows of the embedding and lm_head.
    pub(crate) vocab: Range<usize>,
    /// This rank's attention geometry.
    pub(crate) layout: AttentionLayout,
}

impl ShardPlan {
    pub(crate) fn new(config: &ModelConfig, shard: TpShard) -> Result<ShardPlan, Error> {
        let n = shard.world_size;
        let bad = |field: &'static str, value: usize, detail: String| Error::TensorParallel {
            world_size: n,
            field,
            value,
            detail,
        };
        if n == 0 || shard.rank >= n {
            return Err(bad(
                "rank",
                shard.rank,
                format!("must be below the world size {n}"),
            ));
        }
        let (n_q, n_kv, head_dim) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        if !n_q.is_multiple_of(n) {
            return Err(bad(
                "num_attention_heads",
                n_q,
                format!("is not divisible by the tensor-parallel size {n}"),
            ));
        }
        let kv_heads = if n_kv.is_multiple_of(n) {
            shard.split(n_kv)
        } else if n.is_multiple_of(n_kv) {
            let head = shard.rank * n_kv / n;
            head..head + 1
        } else {
            return Err(bad(
                "num_key_value_heads",
                n_kv,
                format!(
                    "neither divides nor is a divisor of the tensor-parallel size {n} (KV heads are split or replicated whole)"
                ),
            ));
        };
        for (field, value) in [
            ("intermediate_size", config.intermediate_size),
            ("vocab_size", config.vocab_size),
        ] {
            if value < n {
                return Err(bad(
                    field,
                    value,
                    format!("is smaller than the tensor-parallel size {n}"),
                ));
            }
        }
        let q_heads = shard.split(n_q);
        let layout = AttentionLayout {
            n_heads: q_heads.len(),
            n_kv_heads: kv_heads.len(),
            ..config.attention_layout()
        };
        Ok(ShardPlan {
            shard,
            q_rows: q_heads.start * head_dim..q_heads.end * head_dim,
            kv_rows: kv_heads.start * head_dim..kv_heads.end * head_dim,
            inter: shard.split(config.intermediate_size),
            vocab: shard.split(config.vocab_size),
            layout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(n_q: usize, n_kv: usize) -> ModelConfig {
        let mut config = ModelConfig::preset("tiny").expect("preset");
        config.num_attention_heads = n_q;
        config.num_key_value_heads = n_kv;
        config
    }

    fn plans(config: &ModelConfig, n: usize) -> Vec<ShardPlan> {
        (0..n)
            .map(|rank| {
                ShardPlan::new(
                    config,
                    TpShard {
                        rank,
                        world_size: n,
                    },
                )
                .expect("plan")
            })
            .collect()
    }

    /// Every query head of every rank reads the KV head the unsharded model gives it.
    #[test]
    fn query_heads_keep_their_kv_head_when_split_or_replicated() {
        for (n_q, n_kv, n) in [
            (8, 8, 2),
            (8, 2, 2),
            (8, 2, 4),
            (8, 2, 8),
            (8, 1, 4),
            (8, 4, 8),
        ] {
            let config = config(n_q, n_kv);
            let d = config.head_dim;
            let mut covered = Vec::new();
            for plan in plans(&config, n) {
                let layout = plan.layout;
                assert_eq!(layout.n_heads % layout.n_kv_heads, 0);
                let group = layout.n_heads / layout.n_kv_heads;
                for j in 0..layout.n_heads {
                    let global_q = plan.q_rows.start / d + j;
                    let global_kv = plan.kv_rows.start / d + j / group;
                    assert_eq!(
                        global_kv,
                        global_q / (n_q / n_kv),
                        "{n_q}q/{n_kv}kv over {n}: rank {} head {j}",
                        plan.shard.rank
                    );
                    covered.push(global_q);
                }
            }
            assert_eq!(covered, (0..n_q).collect::<Vec<_>>(), "heads tile exactly");
        }
    }

    #[test]
    fn splits_tile_the_vocabulary_and_intermediate_size() {
        let mut config = config(8, 2);
        config.vocab_size = 4001;
        for n in [1, 2, 4] {
            let plans = plans(&config, n);
            let ends: Vec<usize> = plans.iter().map(|p| p.vocab.end).collect();
            assert_eq!(plans[0].vocab.start, 0);
            assert_eq!(*ends.last().expect("ranks"), 4001);
            for w in plans.windows(2) {
                assert_eq!(w[0].vocab.end, w[1].vocab.start);
                assert_eq!(w[0].inter.end, w[1].inter.start);
            }
        }
    }

    #[test]
    fn unsplittable_configs_name_the_field_and_the_size() {
        let cases = [
            (config(8, 8), 3, "num_attention_heads"),
            (config(12, 4), 6, "num_key_value_heads"),
        ];
        for (config, n, field) in cases {
            let err = ShardPlan::new(
                &config,
                TpShard {
                    rank: 0,
                    world_size: n,
                },
            )
            .expect_err(field)
            .to_string();
            assert!(err.contains(field) && err.contains(&n.to_string()), "{err}");
        }
    }
}
