//! Project tasks: `cargo xtask build|test|run|bench`.

mod bench;
mod build;
mod packages;
mod run;
mod test;
mod toolchain;
mod workspace;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and run the egress gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build all binaries (bootstraps bpf-linker first).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// fmt, clippy (host and BPF), unit tests, then the packet/namespace tests (root).
    Test,
    /// Run the demo from the `tests` crate against the debug gateway (root).
    Run,
    /// Run the `tests` crate's benchmarks in release (root).
    Bench {
        /// Only these parts (comma-separated), written to
        /// target/bench/partial.json; all of them by default, written to
        /// target/bench/latest.json.
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<bench::Part>,
    },
}

fn main() -> ExitCode {
    let command = Cli::parse().command;
    // One line naming the failed step; anyhow's Debug output would add a backtrace.
    match dispatch(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<()> {
    let mut ws = workspace::Workspace::load()?;
    match command {
        Command::Build { release } => build::build(&mut ws, release),
        Command::Test => test::test(&mut ws),
        Command::Run => run::run(&mut ws),
        Command::Bench { only } => bench::bench(&mut ws, &only),
    }
}
