//! `ufa info`.

use crate::ComputeOpts;
use std::process::ExitCode;

pub fn run(opts: &ComputeOpts) -> ufa::Result<ExitCode> {
    let ctx = opts.context(None)?;
    println!("ufa {}", ufa::VERSION);
    println!("cpu features:   {}", ufa::cpu_features().join(" "));
    let isa = ctx.cpu_isa();
    println!("cpu kernels:    {isa} ({})", isa.why());
    if let Some(r) = ufa::rates() {
        println!(
            "cpu rates:      {:.0} GFLOP/s in fp32 FMAs, {:.0} in bf16 dot products, a core \
             (measured; bf16 tiles take dot products where the second is {}x the first or more)",
            r.fma_gflops,
            r.bf16_dot_gflops,
            ufa::BF16_DOT_MIN_RATIO
        );
    }
    if let Some(llc) = ufa::last_level_cache() {
        println!(
            "cpu caches:     last level {} MiB (grouped-query decoding over larger caches \
             loads rows ahead)",
            llc >> 20
        );
    }
    let amx = ufa::amx();
    if amx.cpu {
        let state = if !amx.os {
            "present, but its tile state is not enabled by the operating system"
        } else if !amx.granted {
            "present, but the operating system refused this process its tile data"
        } else if isa == ufa::Isa::AmxBf16 {
            "in use by the amx-bf16 kernels for bf16 tiles"
        } else {
            "usable, not in use: this context runs another kernel family (--cpu-isa amx-bf16, \
             the cpu_isa option of the APIs, takes it for bf16 tiles)"
        };
        println!("amx:            {state}");
    }
    println!("cpu threads:    {}", ctx.num_threads());
    match ctx.cuda_devices() {
        Ok(devs) if !devs.is_empty() => {
            println!("cuda:           {} device(s)", devs.len());
            for (i, d) in devs.iter().enumerate() {
                println!("  cuda:{i}  {d}");
            }
        }
        Ok(_) => println!("cuda:           no devices found"),
        Err(why) => println!("cuda:           unavailable ({why})"),
    }
    println!(
        "cuda kernels:   tensor cores for {}",
        ufa::tensor_core_coverage()
    );
    Ok(ExitCode::SUCCESS)
}
