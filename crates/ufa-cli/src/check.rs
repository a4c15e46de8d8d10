//! `ufa check`: every backend against the f64 reference.

use crate::ComputeOpts;
use std::process::ExitCode;
use ufa::testing::{check_grads, standard_cases, standard_grad_cases, Instance};
use ufa::Isa;

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
}

pub fn run(args: &Args) -> ufa::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(ufa::testing::seed);
    let isas: Vec<Isa> = if args.best_only {
        vec![Isa::detect()]
    } else {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    };
    let mut backends = Vec::new();
    for isa in isas {
        backends.push((format!("cpu/{isa}"), args.compute.context(Some(isa))?));
    }
    println!("ufa check: seed {seed} (replay with --seed {seed})");
    if let Err(why) = backends[0].1.cuda_devices() {
        println!("cuda: skipped ({why})");
    }
    println!(
        "{:<52} {:<13} {:>10} {:>10} {:>9}  result",
        "case", "backend", "rel err", "lse err", "bound"
    );
    let (mut passed, mut failed) = (0, 0);
    for (i, case) in standard_cases().iter().enumerate() {
        let case_seed = seed.wrapping_add(i as u64);
        let mut reference = None;
        for (name, ctx) in &backends {
            let mut inst = Instance::new(case, case_seed);
            let outcome = inst.run(ctx).and_then(|()| {
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
            if ok {
                passed += 1;
            } else {
                failed += 1;
            }
            println!(
                "{:<52} {:<13} {:>10} {:>10} {:>9.0e}  {}",
                case.describe(),
                name,
                err,
                lse,
                case.tolerance(),
                if ok { "pass" } else { "FAIL" }
            );
        }
    }
    println!();
    println!(
        "{:<52} {:<13} {:>10} {:>10} {:>10}  result",
        "backward case", "backend", "dq err", "dk err", "dv err"
    );
    for (i, case) in standard_grad_cases().iter().enumerate() {
        for (name, ctx) in &backends {
            let (errs, ok) = match check_grads(ctx, case, seed.wrapping_add(1000 + i as u64)) {
                Ok(c) => (
                    format!("{:>10.2e} {:>10.2e} {:>10.2e}", c.dq, c.dk, c.dv),
                    c.passed(),
                ),
                Err(e) => (format!("error: {e}"), false),
            };
            if ok {
                passed += 1;
            } else {
                failed += 1;
            }
            println!(
                "{:<52} {:<13} {}  {}",
                case.describe(),
                name,
                errs,
                if ok { "pass" } else { "FAIL" }
            );
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
