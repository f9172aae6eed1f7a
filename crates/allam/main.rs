//! `allam`: the composition root. Parses flags, installs signal handlers and telemetry, and
//! wires router, worker, engine and backend together. The only place that uses `anyhow`.

mod bench;
mod bench_engine;
mod chat;
mod cli;
mod demo;
mod generate;
mod gpu_selftest;
mod model_source;
mod serve;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: cli::Cli) -> anyhow::Result<std::process::ExitCode> {
    use cli::Command;
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::SynthModel(args) => model_source::synth_model(args),
        Command::DemoModel(args) => model_source::demo_model(args),
        Command::Serve(args) => serve::serve(args),
        Command::Router(args) => serve::router(args),
        Command::Worker(args) => serve::worker(args),
        Command::Demo(args) => demo::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchEngine(args) => bench_engine::run(args),
        Command::GpuSelftest(args) => gpu_selftest::run(args),
    }
}
