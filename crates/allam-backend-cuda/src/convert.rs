//! Host-side dtype conversion for uploads and downloads: checkpoints arrive as bf16, f16 or
//! f32 little-endian bytes and live on the device as bf16 (round to nearest even, the same
//! rounding torch's `.to(torch.bfloat16)` uses).

use allam_backend::DType;
use half::bf16;

/// `bytes` of `dtype` as bf16 values; `None` when the length is not whole elements.
pub(crate) fn bytes_to_bf16(dtype: DType, bytes: &[u8]) -> Option<Vec<bf16>> {
    if !bytes.len().is_multiple_of(dtype.size_in_bytes()) {
        return None;
    }
    let out = match dtype {
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        // DType is non_exhaustive: a new checkpoint dtype needs its own conversion here.
        _ => return None,
    };
    Some(out)
}

pub(crate) fn f32_to_bf16(data: &[f32]) -> Vec<bf16> {
    data.iter().map(|v| bf16::from_f32(*v)).collect()
}

pub(crate) fn bf16_to_f32(data: &[bf16]) -> Vec<f32> {
    data.iter().map(|v| v.to_f32()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_converts_with_round_to_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values (1 and 1 + 2^-7): ties go to
        // the even mantissa, 1.0. 1 + 3 * 2^-8 ties up to 1 + 2^-6.
        let vals = [1.0f32, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5, 0.0];
        let want = [1.0f32, 1.0, 1.0 + 1.0 / 64.0, -2.5, 0.0];
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let got: Vec<f32> = bytes_to_bf16(DType::F32, &f32_bytes)
            .expect("whole")
            .iter()
            .map(|v| v.to_f32())
            .collect();
        assert_eq!(got, want);

        let bf_bytes: Vec<u8> = want
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        let got = bf16_to_f32(&bytes_to_bf16(DType::BF16, &bf_bytes).expect("whole"));
        assert_eq!(got, want);

        let f16_bytes: Vec<u8> = [0.5f32, -3.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let got = bf16_to_f32(&bytes_to_bf16(DType::F16, &f16_bytes).expect("whole"));
        assert_eq!(got, [0.5, -3.0]);

        assert_eq!(bytes_to_bf16(DType::F32, &[0, 0, 0]), None);
        assert_eq!(bf16_to_f32(&f32_to_bf16(&[3.0, -0.25])), [3.0, -0.25]);
    }
}
