//! `selftest`: every CUDA op against its CPU twin (`allam-backend-cpu`, f32) on random
//! inputs, for the GPU machine (`allam gpu-selftest`, scripts/gpu-check.sh).
//!
//! Inputs are rounded to bf16 on the host first, so both backends start from identical
//! values; the CUDA side then differs only by bf16 storage of results and f32 summation
//! order. Each comparison passes when every element satisfies
//! `|cuda - cpu| <= atol + rtol * |cpu|`; the (atol, rtol) of each op is in
//! `OpCheck::tolerance` and was chosen from bf16's relative step (2^-8) times the number of
//! roundings on the op's path, with headroom. Exact ops (gathers, copies) use 0.
//! A failing op is reported, not fatal: the remaining checks still run.

use allam_backend::{Backend, DType, Error as OpError, Tensor, Weight};
use allam_backend_cpu::{CpuBackend, CpuBackendConfig};

use crate::{CudaBackend, CudaBackendConfig, Error};

/// One comparison of a CUDA op with the CPU twin.
#[derive(Debug, Clone, PartialEq)]
pub struct OpCheck {
    /// Backend op (`attention`, `rms_norm`, ...).
    pub op: String,
    /// Shapes and variant, e.g. `heads=8 kv=2 hd=32 mixed`.
    pub case: String,
    /// Largest |cuda - cpu| over the compared elements.
    pub max_abs_err: f64,
    /// Largest |cuda - cpu| / (atol + rtol * |cpu|); the check passes when <= 1.
    pub worst_ratio: f64,
    /// Human-readable tolerance, e.g. `atol 1e-2 + rtol 1e-2`.
    pub tolerance: String,
    pub passed: bool,
    /// Error text when the op failed outright, or notes.
    pub detail: String,
}

impl OpCheck {
    /// One line for logs and the gpu-check report.
    pub fn summary_line(&self) -> String {
        format!(
            "{} {:<16} {:<40} max_abs_err={:.3e} worst={:.3} ({}) {}",
            if self.passed { "PASS" } else { "FAIL" },
            self.op,
            self.case,
            self.max_abs_err,
            self.worst_ratio,
            self.tolerance,
            self.detail
        )
    }
}

/// Runs every check on GPU `device` (NVRTC settings from the environment).
pub fn selftest(device: usize) -> Result<Vec<OpCheck>, Error> {
    selftest_with_config(&CudaBackendConfig::from_env(device))
}

pub fn selftest_with_config(config: &CudaBackendConfig) -> Result<Vec<OpCheck>, Error> {
    let gpu = CudaBackend::with_config(config)?;
    let cpu = CpuBackend::new(&CpuBackendConfig {
        threads: None,
        kv_cache_budget_bytes: 4 << 30,
    })?;
    let mut h = Harness {
        dut: Dut::Cuda(Box::new(gpu)),
        cpu,
        rng: Rng(0x5eed_a11a_2024),
        checks: Vec::new(),
        quick: false,
    };
    crate::selftest_cases::run_all(&mut h);
    Ok(h.checks)
}

/// The backend under test. The CPU variant lets the cases themselves be tested without a
/// GPU (CPU against CPU must agree exactly).
pub(crate) enum Dut {
    Cuda(Box<CudaBackend>),
    #[cfg_attr(not(test), allow(dead_code))]
    Cpu(Box<CpuBackend>),
}

impl Dut {
    pub(crate) fn backend(&mut self) -> &mut dyn Backend {
        match self {
            Dut::Cuda(b) => b.as_mut(),
            Dut::Cpu(b) => b.as_mut(),
        }
    }
    /// The CUDA backend, for its inherent ops (f32 logits, device sampling).
    pub(crate) fn cuda(&mut self) -> Option<&mut CudaBackend> {
        match self {
            Dut::Cuda(b) => Some(b.as_mut()),
            Dut::Cpu(_) => None,
        }
    }
}

/// Both backends, a deterministic RNG and the results so far.
pub(crate) struct Harness {
    pub(crate) dut: Dut,
    pub(crate) cpu: CpuBackend,
    pub(crate) rng: Rng,
    pub(crate) checks: Vec<OpCheck>,
    /// Smaller shapes (same code paths) for the CPU-against-CPU unit test.
    pub(crate) quick: bool,
}

/// Per-element tolerance.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tol {
    pub(crate) atol: f64,
    pub(crate) rtol: f64,
}

pub(crate) const EXACT: Tol = Tol {
    atol: 0.0,
    rtol: 0.0,
};

impl Harness {
    /// Records `result`: an op error becomes a failed check.
    pub(crate) fn record(
        &mut self,
        op: &str,
        case: &str,
        tol: Tol,
        result: Result<(Vec<f32>, Vec<f32>), OpError>,
    ) {
        let check = match result {
            Ok((cuda, cpu)) => compare(op, case, tol, &cuda, &cpu),
            Err(e) => OpCheck {
                op: op.to_owned(),
                case: case.to_owned(),
                max_abs_err: f64::NAN,
                worst_ratio: f64::INFINITY,
                tolerance: tol_text(tol),
                passed: false,
                detail: e.to_string(),
            },
        };
        self.checks.push(check);
    }

    /// `n` normal samples with standard deviation `std`, rounded to bf16.
    pub(crate) fn normal_bf16(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| round_bf16(self.rng.normal() * std))
            .collect()
    }

    /// Runs `f` on the CUDA then the CPU backend.
    pub(crate) fn both<T>(
        &mut self,
        mut f: impl FnMut(&mut dyn Backend) -> Result<T, OpError>,
    ) -> Result<(T, T), OpError> {
        let cuda = f(self.dut.backend())?;
        let cpu = f(&mut self.cpu)?;
        Ok((cuda, cpu))
    }
}

pub(crate) fn round_bf16(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

/// Uploads bf16-exact `data` as a weight (checkpoint bytes in bf16, like a real load).
pub(crate) fn upload_weight(
    b: &mut dyn Backend,
    name: &str,
    shape: &[usize],
    data: &[f32],
) -> Result<Weight, OpError> {
    let bytes: Vec<u8> = data
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    b.upload_weight(name, DType::BF16, shape, &bytes)
}

pub(crate) fn upload(
    b: &mut dyn Backend,
    shape: &[usize],
    data: &[f32],
) -> Result<Tensor, OpError> {
    b.upload_f32(shape, data)
}

fn tol_text(t: Tol) -> String {
    if t.atol == 0.0 && t.rtol == 0.0 {
        "exact".to_owned()
    } else {
        format!("atol {:.0e} + rtol {:.0e}", t.atol, t.rtol)
    }
}

pub(crate) fn compare(op: &str, case: &str, tol: Tol, cuda: &[f32], cpu: &[f32]) -> OpCheck {
    let mut max_abs = 0.0f64;
    let mut worst = 0.0f64;
    let mut worst_at = 0usize;
    let mut detail = String::new();
    if cuda.len() != cpu.len() {
        detail = format!("length {} vs {}", cuda.len(), cpu.len());
        worst = f64::INFINITY;
    }
    for (i, (a, b)) in cuda.iter().zip(cpu).enumerate() {
        let (a, b) = (f64::from(*a), f64::from(*b));
        let d = (a - b).abs();
        let d = if d.is_nan() { f64::INFINITY } else { d };
        max_abs = max_abs.max(d);
        let allowed = tol.atol + tol.rtol * b.abs();
        let ratio = if d == 0.0 {
            0.0
        } else if allowed == 0.0 {
            f64::INFINITY
        } else {
            d / allowed
        };
        if ratio > worst {
            worst = ratio;
            worst_at = i;
        }
    }
    let passed = worst <= 1.0;
    if !passed && detail.is_empty() {
        detail = format!(
            "worst at element {worst_at}: cuda {} vs cpu {}",
            cuda.get(worst_at).copied().unwrap_or(f32::NAN),
            cpu.get(worst_at).copied().unwrap_or(f32::NAN)
        );
    }
    OpCheck {
        op: op.to_owned(),
        case: case.to_owned(),
        max_abs_err: max_abs,
        worst_ratio: worst,
        tolerance: tol_text(tol),
        passed,
        detail,
    }
}

/// splitmix64: small, seedable, good enough for test data.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub(crate) fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// Standard normal (Box-Muller).
    pub(crate) fn normal(&mut self) -> f32 {
        let u1 = (self.uniform() as f64).max(1e-12);
        let u2 = self.uniform() as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_applies_atol_plus_rtol_per_element() {
        let tol = Tol {
            atol: 0.1,
            rtol: 0.1,
        };
        let c = compare("op", "case", tol, &[1.0, 10.0], &[1.15, 10.0]);
        assert!(c.passed, "{c:?}"); // 0.15 <= 0.1 + 0.115
        let c = compare("op", "case", tol, &[1.0, 10.0], &[1.3, 10.0]);
        assert!(!c.passed);
        assert!(c.detail.contains("element 0"), "{}", c.detail);
        assert!((c.max_abs_err - 0.3).abs() < 1e-6);
        let c = compare("op", "case", EXACT, &[1.0, f32::NAN], &[1.0, 2.0]);
        assert!(!c.passed && c.worst_ratio.is_infinite());
        let c = compare("op", "case", EXACT, &[1.0], &[1.0, 2.0]);
        assert!(!c.passed, "length mismatch must fail");
        assert!(compare("op", "case", EXACT, &[3.0], &[3.0]).passed);
    }

    /// The cases themselves (batches, shapes, tables) are valid and deterministic: run with
    /// the CPU backend on both sides, every check must pass with zero error.
    #[test]
    fn every_case_runs_cpu_against_cpu_without_error() {
        let cpu = || {
            CpuBackend::new(&CpuBackendConfig {
                threads: Some(2),
                kv_cache_budget_bytes: 4 << 30,
            })
            .expect("cpu backend")
        };
        let mut h = Harness {
            dut: Dut::Cpu(Box::new(cpu())),
            cpu: cpu(),
            rng: Rng(1),
            checks: Vec::new(),
            quick: true,
        };
        crate::selftest_cases::run_all(&mut h);
        assert!(h.checks.len() >= 20, "only {} checks", h.checks.len());
        for c in &h.checks {
            assert!(c.passed && c.max_abs_err == 0.0, "{}", c.summary_line());
        }
    }

    #[test]
    fn rng_is_deterministic_and_roughly_normal() {
        let mut a = Rng(7);
        let mut b = Rng(7);
        assert_eq!(a.next_u64(), b.next_u64());
        let xs: Vec<f32> = (0..20_000).map(|_| a.normal()).collect();
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / xs.len() as f32;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
        assert!((0..1000).all(|_| (0.0..1.0).contains(&a.uniform())));
    }
}
