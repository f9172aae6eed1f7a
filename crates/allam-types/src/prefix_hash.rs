//! Chained hashes of full KV blocks, shared by the engine's prefix cache and the router's
//! prefix-affinity routing, which must agree on them across processes and machines.
//!
//! Block `i`'s hash covers its own `block_size` tokens and, through the previous block's
//! hash, every token before it: two sequences share block `i`'s hash only if their first
//! `(i + 1) * block_size` tokens are equal (up to 64-bit collisions). Only full blocks get a
//! hash; a trailing partial block is never shared.
//!
//! The function is FNV-1a over little-endian bytes (parent hash, then each token) followed by
//! the murmur3 `fmix64` finaliser. FNV-1a alone mixes its last bytes poorly, and chained hashes
//! feed each other, so the finaliser spreads every input bit over the whole value. No
//! `RandomState`, no platform-dependent width: the same tokens give the same hashes everywhere.
//! Changing this function is a protocol change between router and workers.

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Parent value of the first block, so that block 0 is also hashed over 8 parent bytes.
const ROOT_PARENT: u64 = 0x616c_6c61_6d6b_7631; // "allamkv1"

/// Hash of one full block given the previous block's hash (`None` for block 0).
pub fn next_block_hash(parent: Option<u64>, block_tokens: &[u32]) -> u64 {
    let mut state = FNV_OFFSET_BASIS;
    for byte in parent.unwrap_or(ROOT_PARENT).to_le_bytes() {
        state = (state ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
    }
    for token in block_tokens {
        for byte in token.to_le_bytes() {
            state = (state ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
        }
    }
    fmix64(state)
}

/// The chained hash of each full block of `tokens` (`tokens.len() / block_size` entries).
/// Returns an empty vector when `block_size` is 0.
pub fn prefix_block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut hashes = Vec::with_capacity(tokens.len() / block_size);
    let mut parent = None;
    for block in tokens.chunks_exact(block_size) {
        let hash = next_block_hash(parent, block);
        hashes.push(hash);
        parent = Some(hash);
    }
    hashes
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_full_blocks_are_hashed() {
        assert_eq!(prefix_block_hashes(&[1, 2, 3], 4).len(), 0);
        assert_eq!(prefix_block_hashes(&[1, 2, 3, 4, 5], 4).len(), 1);
        assert_eq!(
            prefix_block_hashes(&(0..32).collect::<Vec<_>>(), 16).len(),
            2
        );
        assert!(prefix_block_hashes(&[1, 2], 0).is_empty());
    }

    #[test]
    fn hashes_are_chained_over_everything_before() {
        let a: Vec<u32> = (0..32).collect();
        let mut b = a.clone();
        b[0] = 999; // differs only in block 0
        let ha = prefix_block_hashes(&a, 16);
        let hb = prefix_block_hashes(&b, 16);
        assert_ne!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1], "block 1 must depend on block 0's tokens");
        // A shared prefix gives shared hashes, whatever follows.
        let mut c = a.clone();
        c[20] = 7;
        let hc = prefix_block_hashes(&c, 16);
        assert_eq!(ha[0], hc[0]);
        assert_ne!(ha[1], hc[1]);
    }

    #[test]
    fn incremental_equals_batch() {
        let tokens: Vec<u32> = (0..100).map(|i| i * 7 + 3).collect();
        let batch = prefix_block_hashes(&tokens, 8);
        let mut parent = None;
        for (i, block) in tokens.chunks_exact(8).enumerate() {
            let h = next_block_hash(parent, block);
            assert_eq!(h, batch[i]);
            parent = Some(h);
        }
    }

    #[test]
    fn token_order_matters() {
        assert_ne!(
            next_block_hash(None, &[1, 2]),
            next_block_hash(None, &[2, 1])
        );
        assert_ne!(
            next_block_hash(None, &[1, 2]),
            next_block_hash(Some(0), &[1, 2])
        );
    }

    #[test]
    fn values_are_pinned() {
        // Computed by an independent Python implementation of the definition above; the
        // router and the workers must produce exactly these numbers.
        assert_eq!(
            prefix_block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4),
            vec![0xf6f6_daff_093b_bc93, 0x3f35_a5cf_9432_3556]
        );
    }
}
