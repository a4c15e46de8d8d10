//! `ufa`: information, correctness checks and benchmarks for Universal Flash Attention.

mod bench;
mod check;
mod device;
mod info;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ufa",
    version,
    about = "Universal Flash Attention: info, check and bench"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand that computes shares.
#[derive(clap::Args, Clone, Debug)]
pub struct ComputeOpts {
    /// CPU threads (default: $UFA_NUM_THREADS, else all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// CPU kernel family: amx-bf16, avx512bf16, avx512bf16-decode, avx512, avx2 or portable (default:
    /// the one `ufa info` names for this machine). One this CPU cannot run is an error.
    #[arg(long)]
    cpu_isa: Option<ufa::Isa>,
}

impl ComputeOpts {
    fn context(&self, isa: Option<ufa::Isa>) -> ufa::Result<ufa::Context> {
        let mut b = ufa::Context::builder();
        if let Some(n) = self.threads {
            b = b.num_threads(n);
        }
        if let Some(isa) = isa.or(self.cpu_isa) {
            b = b.cpu_isa(isa);
        }
        b.build()
    }
}

#[derive(Subcommand)]
enum Command {
    /// Version, CPU features and kernel family, thread count, GPU backends.
    Info(ComputeOpts),
    /// Runs every available backend against the f64 reference on a spread of problems.
    Check(check::Args),
    /// Times the forward pass on standard shapes.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so a reader that stops early (`ufa info | head -3`) made println!
    // panic with a backtrace; with the default action the command ends quietly, as Unix
    // tools do.
    #[cfg(unix)]
    // SAFETY: called first thing, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(opts) => info::run(&opts),
        Command::Check(args) => check::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ufa: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn device_option_reaches_check_and_bench() {
        for argv in [
            &["ufa", "check", "--device", "cuda:1"][..],
            &["ufa", "check"],
            &["ufa", "bench", "--device", "cuda", "--dtype", "f16"],
            &["ufa", "bench"],
        ] {
            Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        }
        for argv in [
            &["ufa", "check", "--device", "tpu"][..],
            &["ufa", "bench", "--device", "cuda:x"],
        ] {
            let e = Cli::try_parse_from(argv).err().expect("rejected");
            assert!(e.to_string().contains("--device"), "{argv:?}: {e}");
        }
    }
}
