//! Project tasks: `cargo xtask build|test|run|bench`.

mod bench;
mod build;
mod debian;
mod initrd;
mod oldest_kernel;
mod packages;
mod run;
mod test;
mod test_output;
mod toolchain;
mod vm;
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
    /// fmt, clippy (host and BPF), unit tests, the packet/namespace tests
    /// (root), then packet tests on Linux 6.1 in a QEMU VM.
    Test {
        /// Leave out the Linux 6.1 VM (a few minutes).
        #[arg(long)]
        skip_oldest_kernel: bool,
    },
    /// Only the Linux 6.1 step: packet tests, then `egress check` and
    /// `egress run`, in a QEMU VM (root).
    OldestKernel {
        /// All of them (about half an hour under emulation), not the usual subset.
        #[arg(long)]
        all: bool,
    },
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
        Command::Test { skip_oldest_kernel } => test::test(&mut ws, !skip_oldest_kernel),
        Command::OldestKernel { all } => test::oldest_kernel(&mut ws, all),
        Command::Run => run::run(&mut ws),
        Command::Bench { only } => bench::bench(&mut ws, &only),
    }
}
