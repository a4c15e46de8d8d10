//! `ufa check`: every backend against the f64 reference.

use crate::device::{cuda_ordinals, DeviceArg};
use crate::ComputeOpts;
use std::process::ExitCode;
use std::rc::Rc;
use ufa::{Context, Isa};
use ufa_testkit::cuda::check_grads_cuda;
use ufa_testkit::{
    check_grads, check_kvcache, check_kvcache_cuda, check_merge, check_merge_cuda, check_varlen,
    check_varlen_cuda, check_varlen_grads, check_varlen_grads_cuda, kvcache_cases, merge_cases,
    standard_cases, standard_grad_cases, varlen_cases, varlen_grad_cases, Case, Comparison,
    Described, GradComparison, Instance, KvCacheCase, MergeCase, VarlenCase,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    compute: ComputeOpts,
    /// Seed of the random inputs (default: $UFA_TEST_SEED, else drawn from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Only the best CPU kernel family instead of every one this CPU runs.
    #[arg(long)]
    best_only: bool,
    /// Backends to check: cpu, cuda (every CUDA device; an error if there is none), cuda:N, or
    /// all (every backend present).
    #[arg(long, default_value = "all")]
    device: DeviceArg,
}

/// Where one backend's kernels run.
#[derive(Clone, Copy, Debug)]
enum Target {
    Cpu,
    Cuda(u32),
}

/// One column of results: a CPU kernel family or a CUDA device.
struct Backend {
    name: String,
    /// Shared by the CUDA devices: one context keeps every device's loaded modules.
    ctx: Rc<Context>,
    target: Target,
}

impl Backend {
    fn forward(&self, inst: &mut Instance) -> ufa::Result<()> {
        match self.target {
            Target::Cpu => inst.run(&self.ctx),
            Target::Cuda(n) => inst.run_cuda(&self.ctx, n),
        }
    }

    fn grads(&self, case: &Case, seed: u64) -> ufa::Result<GradComparison> {
        match self.target {
            Target::Cpu => check_grads(&self.ctx, case, seed),
            Target::Cuda(n) => check_grads_cuda(&self.ctx, case, seed, n),
        }
    }

    fn varlen(&self, case: &VarlenCase, seed: u64) -> ufa::Result<Comparison> {
        match self.target {
            Target::Cpu => check_varlen(&self.ctx, case, seed),
            Target::Cuda(n) => check_varlen_cuda(&self.ctx, case, seed, n),
        }
    }

    fn varlen_grads(&self, case: &VarlenCase, seed: u64) -> ufa::Result<GradComparison> {
        match self.target {
            Target::Cpu => check_varlen_grads(&self.ctx, case, seed),
            Target::Cuda(n) => check_varlen_grads_cuda(&self.ctx, case, seed, n),
        }
    }

    fn kvcache(&self, case: &KvCacheCase, seed: u64) -> ufa::Result<Comparison> {
        match self.target {
            Target::Cpu => check_kvcache(&self.ctx, case, seed),
            Target::Cuda(n) => check_kvcache_cuda(&self.ctx, case, seed, n),
        }
    }

    fn merge(&self, case: &MergeCase, seed: u64) -> ufa::Result<Comparison> {
        match self.target {
            Target::Cpu => check_merge(&self.ctx, case, seed),
            Target::Cuda(n) => check_merge_cuda(&self.ctx, case, seed, n),
        }
    }
}

fn backends(args: &Args) -> ufa::Result<Vec<Backend>> {
    let mut backends = Vec::new();
    if args.device.wants_cpu() {
        // --cpu-isa names the one family to check; without it, every family this CPU runs.
        let isas: Vec<Isa> = if let Some(isa) = args.compute.cpu_isa {
            vec![isa]
        } else if args.best_only {
            vec![Isa::detect()]
        } else {
            Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
        };
        for isa in isas {
            backends.push(Backend {
                name: format!("cpu/{isa}"),
                ctx: Rc::new(args.compute.context(Some(isa))?),
                target: Target::Cpu,
            });
        }
    }
    if args.device.wants_cuda() {
        let ctx = Rc::new(args.compute.context(None)?);
        let cuda = cuda_ordinals(&ctx, args.device)?;
        if let Some(why) = cuda.skipped {
            println!("cuda: skipped ({why})");
        }
        for n in cuda.ordinals {
            backends.push(Backend {
                name: format!("cuda:{n}"),
                ctx: ctx.clone(),
                target: Target::Cuda(n),
            });
        }
    }
    Ok(backends)
}

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
}

impl Tally {
    fn verdict(&mut self, ok: bool) -> &'static str {
        if ok {
            self.passed += 1;
            "pass"
        } else {
            self.failed += 1;
            "FAIL"
        }
    }
}

pub fn run(args: &Args) -> ufa::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(ufa_testkit::seed);
    println!("ufa check: seed {seed} (replay with --seed {seed})");
    let backends = backends(args)?;
    println!(
        "{:<52} {:<21} {:>10} {:>10} {:>9}  result",
        "case", "backend", "rel err", "lse err", "bound"
    );
    let mut tally = Tally::default();
    for (i, case) in standard_cases().iter().enumerate() {
        let case_seed = seed.wrapping_add(i as u64);
        // Every backend sees the same inputs, so the costly f64 reference is computed once.
        let mut reference = None;
        for b in &backends {
            let mut inst = Instance::new(case, case_seed);
            let outcome = b.forward(&mut inst).and_then(|()| {
                if reference.is_none() {
                    reference = Some(inst.reference()?);
                }
                Ok(inst.compare(reference.as_ref().unwrap()))
            });
            let (err, lse, ok) = match outcome {
                Ok(c) => (
                    format!("{:.2e}", c.out_error),
                    c.lse_error.map_or("-".into(), |e| format!("{e:.2e}")),
                    c.passed(),
                ),
                Err(e) => (format!("error: {e}"), String::new(), false),
            };
            println!(
                "{:<52} {:<21} {:>10} {:>10} {:>9.0e}  {}",
                case.describe(),
                b.name,
                err,
                lse,
                case.tolerance(),
                tally.verdict(ok)
            );
        }
    }
    println!();
    println!(
        "{:<52} {:<21} {:>10} {:>10} {:>10}  result",
        "backward case", "backend", "dq err", "dk err", "dv err"
    );
    for (i, case) in standard_grad_cases().iter().enumerate() {
        for b in &backends {
            let (errs, ok) = match b.grads(case, seed.wrapping_add(1000 + i as u64)) {
                Ok(c) => (
                    format!("{:>10.2e} {:>10.2e} {:>10.2e}", c.dq, c.dk, c.dv),
                    c.passed(),
                ),
                Err(e) => (format!("error: {e}"), false),
            };
            println!(
                "{:<52} {:<21} {}  {}",
                case.describe(),
                b.name,
                errs,
                tally.verdict(ok)
            );
        }
    }
    // Packed batches, KV caches and merges: each case draws its own inputs and reference (the
    // sequence cases are small, so the reference is cheap next to a dense case's).
    let section = |title: &str, seed_base: u64| {
        println!();
        println!(
            "{:<76} {:<21} {:>10} {:>10} {:>9}  result",
            title, "backend", "rel err", "lse err", "bound"
        );
        seed.wrapping_add(seed_base)
    };
    let base = section("packed batch case", 2000);
    for (i, case) in varlen_cases().iter().enumerate() {
        for b in &backends {
            let row = b.varlen(case, base.wrapping_add(i as u64));
            print_forward_row(case, &b.name, row, &mut tally);
        }
    }
    let base = section("KV-cache case", 3000);
    for (i, case) in kvcache_cases().iter().enumerate() {
        for b in &backends {
            let row = b.kvcache(case, base.wrapping_add(i as u64));
            print_forward_row(case, &b.name, row, &mut tally);
        }
    }
    let base = section("merge case", 4000);
    for (i, case) in merge_cases().iter().enumerate() {
        for b in &backends {
            let row = b.merge(case, base.wrapping_add(i as u64));
            print_forward_row(case, &b.name, row, &mut tally);
        }
    }
    println!();
    println!(
        "{:<76} {:<21} {:>10} {:>10} {:>10}  result",
        "packed batch backward case", "backend", "dq err", "dk err", "dv err"
    );
    for (i, case) in varlen_grad_cases().iter().enumerate() {
        for b in &backends {
            let (errs, ok) = match b.varlen_grads(case, seed.wrapping_add(5000 + i as u64)) {
                Ok(c) => (
                    format!("{:>10.2e} {:>10.2e} {:>10.2e}", c.dq, c.dk, c.dv),
                    c.passed(),
                ),
                Err(e) => (format!("error: {e}"), false),
            };
            println!(
                "{:<76} {:<21} {}  {}",
                case.describe(),
                b.name,
                errs,
                tally.verdict(ok)
            );
        }
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    Ok(if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One result row of a forward-type check (output and LSE errors against the bound).
fn print_forward_row(
    case: &dyn Described,
    backend: &str,
    outcome: ufa::Result<Comparison>,
    tally: &mut Tally,
) {
    let (err, lse, bound, ok) = match outcome {
        Ok(c) => (
            if c.strays > 0 {
                format!("{:.2e} ({} stray writes)", c.out_error, c.strays)
            } else {
                format!("{:.2e}", c.out_error)
            },
            c.lse_error.map_or("-".into(), |e| format!("{e:.2e}")),
            format!("{:.0e}", c.tolerance),
            c.passed(),
        ),
        Err(e) => (format!("error: {e}"), String::new(), String::new(), false),
    };
    println!(
        "{:<76} {:<21} {:>10} {:>10} {:>9}  {}",
        case.describe(),
        backend,
        err,
        lse,
        bound,
        tally.verdict(ok)
    );
}

#[cfg(test)]
mod tests {
    use crate::{Cli, Command};
    use clap::Parser;

    #[test]
    fn cpu_isa_option_picks_the_family_checked() {
        let cli = Cli::try_parse_from(["ufa", "check", "--device", "cpu", "--cpu-isa", "portable"])
            .unwrap();
        let Command::Check(args) = cli.command else {
            panic!("not check");
        };
        let backends = super::backends(&args).unwrap();
        let names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["cpu/portable"]);
        let e = Cli::try_parse_from(["ufa", "check", "--cpu-isa", "avx1024"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("avx1024"), "{e}");
    }
}
