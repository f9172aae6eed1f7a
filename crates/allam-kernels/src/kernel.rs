//! The kernel table: every `.cu` file (embedded with `include_str!`) and every entry point in
//! it, as enums. Symbols are spelled once, here, in exhaustive matches, so a renamed kernel
//! fails the NVRTC test instead of surfacing as a missing function at run time.

/// Head dimensions the attention kernels are instantiated for (compile-time template sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HeadDim {
    D32,
    D64,
    D128,
}

impl HeadDim {
    pub const ALL: [HeadDim; 3] = [HeadDim::D32, HeadDim::D64, HeadDim::D128];

    /// The instantiation for `head_dim`, if there is one.
    pub fn new(head_dim: usize) -> Option<HeadDim> {
        match head_dim {
            32 => Some(HeadDim::D32),
            64 => Some(HeadDim::D64),
            128 => Some(HeadDim::D128),
            _ => None,
        }
    }

    pub fn get(self) -> usize {
        match self {
            HeadDim::D32 => 32,
            HeadDim::D64 => 64,
            HeadDim::D128 => 128,
        }
    }
}

/// One `.cu` file under `kernels/`: the unit NVRTC compiles and the driver loads as a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelFile {
    Embedding,
    RmsNorm,
    Rope,
    KvWrite,
    PagedAttention,
    PrefillAttention,
    SiluMul,
    Sampling,
}

/// The shared header every file includes; spliced in before compiling.
pub(crate) const BF16_MATH_CUH: &str = include_str!("../../../kernels/bf16_math.cuh");
pub(crate) const INCLUDE_LINE: &str = "#include \"bf16_math.cuh\"";

impl KernelFile {
    pub const ALL: [KernelFile; 8] = [
        KernelFile::Embedding,
        KernelFile::RmsNorm,
        KernelFile::Rope,
        KernelFile::KvWrite,
        KernelFile::PagedAttention,
        KernelFile::PrefillAttention,
        KernelFile::SiluMul,
        KernelFile::Sampling,
    ];

    /// File name under `kernels/`.
    pub fn file_name(self) -> &'static str {
        match self {
            KernelFile::Embedding => "embedding.cu",
            KernelFile::RmsNorm => "rmsnorm.cu",
            KernelFile::Rope => "rope.cu",
            KernelFile::KvWrite => "kv_write.cu",
            KernelFile::PagedAttention => "paged_attention.cu",
            KernelFile::PrefillAttention => "prefill_attention.cu",
            KernelFile::SiluMul => "silu_mul.cu",
            KernelFile::Sampling => "sampling.cu",
        }
    }

    /// The file as written (still including `bf16_math.cuh`).
    pub fn source(self) -> &'static str {
        match self {
            KernelFile::Embedding => include_str!("../../../kernels/embedding.cu"),
            KernelFile::RmsNorm => include_str!("../../../kernels/rmsnorm.cu"),
            KernelFile::Rope => include_str!("../../../kernels/rope.cu"),
            KernelFile::KvWrite => include_str!("../../../kernels/kv_write.cu"),
            KernelFile::PagedAttention => include_str!("../../../kernels/paged_attention.cu"),
            KernelFile::PrefillAttention => include_str!("../../../kernels/prefill_attention.cu"),
            KernelFile::SiluMul => include_str!("../../../kernels/silu_mul.cu"),
            KernelFile::Sampling => include_str!("../../../kernels/sampling.cu"),
        }
    }

    /// The source NVRTC compiles: the shared header spliced in place of its include line.
    pub fn compile_source(self) -> String {
        let mut out = String::with_capacity(self.source().len() + BF16_MATH_CUH.len());
        for line in self.source().lines() {
            out.push_str(if line.trim_end() == INCLUDE_LINE {
                BF16_MATH_CUH
            } else {
                line
            });
            out.push('\n');
        }
        out
    }

    /// Entry points this file defines.
    pub fn kernels(self) -> Vec<Kernel> {
        Kernel::all()
            .into_iter()
            .filter(|k| k.file() == self)
            .collect()
    }
}

/// One `extern "C" __global__` entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kernel {
    EmbeddingGather,
    RmsNorm,
    FusedAddRmsNorm,
    RopeInplace,
    KvCacheWrite,
    PagedAttentionDecode(HeadDim),
    PagedAttentionReduce,
    PrefillAttention(HeadDim),
    SiluMul,
    SampleRows,
}

impl Kernel {
    /// Every kernel, each head-dim instantiation included.
    pub fn all() -> Vec<Kernel> {
        let mut all = vec![
            Kernel::EmbeddingGather,
            Kernel::RmsNorm,
            Kernel::FusedAddRmsNorm,
            Kernel::RopeInplace,
            Kernel::KvCacheWrite,
            Kernel::PagedAttentionReduce,
            Kernel::SiluMul,
            Kernel::SampleRows,
        ];
        for d in HeadDim::ALL {
            all.push(Kernel::PagedAttentionDecode(d));
            all.push(Kernel::PrefillAttention(d));
        }
        all
    }

    /// The `extern "C"` name in the PTX.
    pub fn symbol(self) -> &'static str {
        match self {
            Kernel::EmbeddingGather => "embedding_gather_bf16",
            Kernel::RmsNorm => "rmsnorm_bf16",
            Kernel::FusedAddRmsNorm => "fused_add_rmsnorm_bf16",
            Kernel::RopeInplace => "rope_inplace_bf16",
            Kernel::KvCacheWrite => "kv_cache_write_bf16",
            Kernel::PagedAttentionDecode(HeadDim::D32) => "paged_attention_decode_hd32_bf16",
            Kernel::PagedAttentionDecode(HeadDim::D64) => "paged_attention_decode_hd64_bf16",
            Kernel::PagedAttentionDecode(HeadDim::D128) => "paged_attention_decode_hd128_bf16",
            Kernel::PagedAttentionReduce => "paged_attention_reduce_bf16",
            Kernel::PrefillAttention(HeadDim::D32) => "prefill_attention_hd32_bf16",
            Kernel::PrefillAttention(HeadDim::D64) => "prefill_attention_hd64_bf16",
            Kernel::PrefillAttention(HeadDim::D128) => "prefill_attention_hd128_bf16",
            Kernel::SiluMul => "silu_mul_bf16",
            Kernel::SampleRows => "sample_rows_f32",
        }
    }

    /// The file that defines it.
    pub fn file(self) -> KernelFile {
        match self {
            Kernel::EmbeddingGather => KernelFile::Embedding,
            Kernel::RmsNorm | Kernel::FusedAddRmsNorm => KernelFile::RmsNorm,
            Kernel::RopeInplace => KernelFile::Rope,
            Kernel::KvCacheWrite => KernelFile::KvWrite,
            Kernel::PagedAttentionDecode(_) | Kernel::PagedAttentionReduce => {
                KernelFile::PagedAttention
            }
            Kernel::PrefillAttention(_) => KernelFile::PrefillAttention,
            Kernel::SiluMul => KernelFile::SiluMul,
            Kernel::SampleRows => KernelFile::Sampling,
        }
    }

    /// Source of its file (as written).
    pub fn source(self) -> &'static str {
        self.file().source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn symbols_are_unique_and_defined_in_their_file() {
        let all = Kernel::all();
        let symbols: HashSet<_> = all.iter().map(|k| k.symbol()).collect();
        assert_eq!(
            symbols.len(),
            all.len(),
            "duplicate symbol in the kernel table"
        );
        for k in all {
            let src = k.source();
            // Plain entries appear literally; head-dim instances come from a macro call.
            let literal = src.contains(&format!(" {}(", k.symbol()));
            let via_macro = match k {
                Kernel::PagedAttentionDecode(d) => {
                    src.contains(&format!("ALLAM_DECODE_ENTRY({})", d.get()))
                }
                Kernel::PrefillAttention(d) => {
                    src.contains(&format!("ALLAM_PREFILL_ENTRY({})", d.get()))
                }
                _ => false,
            };
            assert!(
                literal || via_macro,
                "{} not defined in kernels/{}",
                k.symbol(),
                k.file().file_name()
            );
        }
    }

    #[test]
    fn every_file_has_kernels_and_opens_with_its_contract() {
        for f in KernelFile::ALL {
            assert!(
                !f.kernels().is_empty(),
                "{} has no kernels in the table",
                f.file_name()
            );
            let src = f.source();
            assert!(
                src.starts_with(&format!("// {}:", f.file_name())),
                "{} lacks its header comment",
                f.file_name()
            );
            assert!(
                src.contains("Launch:"),
                "{} header lacks the launch contract",
                f.file_name()
            );
            assert!(
                src.contains("CPU twin:"),
                "{} header lacks the CPU twin",
                f.file_name()
            );
            assert!(
                src.lines().any(|l| l == INCLUDE_LINE),
                "{} does not include bf16_math.cuh",
                f.file_name()
            );
        }
    }

    #[test]
    fn compile_source_splices_the_header_once() {
        for f in KernelFile::ALL {
            let s = f.compile_source();
            assert!(!s.contains(INCLUDE_LINE));
            assert_eq!(
                s.matches("__device__ __forceinline__ float block_sum(")
                    .count(),
                1
            );
        }
    }

    #[test]
    fn head_dim_round_trips() {
        for d in HeadDim::ALL {
            assert_eq!(HeadDim::new(d.get()), Some(d));
        }
        assert_eq!(HeadDim::new(96), None);
    }
}
