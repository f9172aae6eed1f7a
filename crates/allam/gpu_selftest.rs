//! `allam gpu-selftest`: every CUDA op against its CPU twin on random inputs
//! (`allam_backend_cuda::selftest`), for `scripts/gpu-check.sh`.

use std::process::ExitCode;

use anyhow::Context;

use crate::cli::GpuSelftestArgs;

pub fn run(args: GpuSelftestArgs) -> anyhow::Result<ExitCode> {
    let ordinal = match args.device.as_str() {
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("--device must be cuda or cuda:N, got {other}"))?,
    };
    let checks = allam_backend_cuda::selftest(ordinal).context("running the CUDA self-test")?;
    let mut all_passed = true;
    for check in &checks {
        println!("{}", check.summary_line());
        all_passed &= check.passed;
    }
    if let Some(path) = &args.json {
        let rows: Vec<serde_json::Value> = checks
            .iter()
            .map(|c| {
                serde_json::json!({
                    "op": c.op, "case": c.case, "max_abs_err": c.max_abs_err,
                    "worst_ratio": c.worst_ratio, "tolerance": c.tolerance,
                    "passed": c.passed, "detail": c.detail,
                })
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "{} of {} checks passed",
        checks.iter().filter(|c| c.passed).count(),
        checks.len()
    );
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
