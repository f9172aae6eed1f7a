//! Element types that cross the backend boundary: what checkpoints store (bf16/f16/f32) and
//! what a backend computes in (CPU f32, CUDA bf16).

use std::fmt;

/// Element type of a weight, activation or KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The lowercase name used in messages and on the CLI (`f32`, `f16`, `bf16`).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decodes little-endian `bytes` of `dtype` into f32 (exact for every supported dtype).
///
/// Shared by backends that widen at upload and by tests; returns `None` when the byte count
/// is not a whole number of elements.
pub fn decode_to_f32(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    let size = dtype.size_in_bytes();
    if !bytes.len().is_multiple_of(size) {
        return None;
    }
    let out = match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    };
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_matches_half_crate_for_each_dtype() {
        let values = [0.0f32, 1.0, -2.5, 65504.0, 1.0e-3];
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_to_f32(DType::F32, &f32_bytes), Some(values.to_vec()));
        let bf: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let want: Vec<f32> = values
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect();
        assert_eq!(decode_to_f32(DType::BF16, &bf), Some(want));
        let hf: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let want: Vec<f32> = values
            .iter()
            .map(|v| half::f16::from_f32(*v).to_f32())
            .collect();
        assert_eq!(decode_to_f32(DType::F16, &hf), Some(want));
        assert_eq!(decode_to_f32(DType::F32, &[0, 1, 2]), None);
    }
}
