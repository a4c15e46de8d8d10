//! `--device`: which backends `ufa check` and `ufa bench` run on.

use std::fmt;
use std::str::FromStr;
use ufa::{Context, Error, ErrorKind};

/// The value of `--device`: `cpu`, `cuda` (every CUDA device), `cuda:N` or `all`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(Option<u32>),
    All,
}

impl DeviceArg {
    pub fn wants_cpu(self) -> bool {
        matches!(self, DeviceArg::Cpu | DeviceArg::All)
    }

    pub fn wants_cuda(self) -> bool {
        !matches!(self, DeviceArg::Cpu)
    }
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" | "gpu" => Ok(DeviceArg::Cuda(None)),
            "all" => Ok(DeviceArg::All),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| DeviceArg::Cuda(Some(n)))
                .ok_or_else(|| format!("'{s}' is not cpu, cuda, cuda:N or all")),
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceArg::Cpu => f.write_str("cpu"),
            DeviceArg::Cuda(None) => f.write_str("cuda"),
            DeviceArg::Cuda(Some(n)) => write!(f, "cuda:{n}"),
            DeviceArg::All => f.write_str("all"),
        }
    }
}

/// The CUDA devices that `--device` names.
#[derive(Debug, PartialEq, Eq)]
pub struct CudaSelection {
    /// Every device for `cuda` and `all`, the one for `cuda:N`.
    pub ordinals: Vec<u32>,
    /// Why `all` found no CUDA device, to be reported beside the CPU results.
    pub skipped: Option<String>,
}

/// Whoever asked for CUDA by name gets an error naming the option when there is none, rather
/// than a silent CPU-only run that looks like a pass; `all` takes what is there.
pub fn cuda_ordinals(ctx: &Context, arg: DeviceArg) -> Result<CudaSelection, Error> {
    if !arg.wants_cuda() {
        return Ok(CudaSelection {
            ordinals: Vec::new(),
            skipped: None,
        });
    }
    let found = ctx.cuda_devices();
    select(arg, found.as_ref().map(|d| d.len()).map_err(String::as_str))
}

/// [`cuda_ordinals`] given the device count or the reason there is none, so it can be tested
/// without a GPU.
fn select(arg: DeviceArg, found: Result<usize, &str>) -> Result<CudaSelection, Error> {
    let unavailable = |why: &str| {
        Error::new(
            ErrorKind::DeviceUnavailable,
            format!("--device {arg}: no CUDA device available ({why}); use --device cpu"),
        )
    };
    let skipped = |why: &str| CudaSelection {
        ordinals: Vec::new(),
        skipped: Some(why.to_string()),
    };
    let ordinals = match (arg, found) {
        (DeviceArg::All, Err(why)) => return Ok(skipped(why)),
        (DeviceArg::All, Ok(0)) => return Ok(skipped("no devices found")),
        (_, Err(why)) => return Err(unavailable(why)),
        (_, Ok(0)) => return Err(unavailable("the driver lists no devices")),
        (DeviceArg::Cuda(Some(n)), Ok(count)) if n as usize >= count => {
            return Err(Error::new(
                ErrorKind::DeviceUnavailable,
                format!(
                    "--device cuda:{n}: this machine has {count} CUDA device(s), cuda:0 to cuda:{}",
                    count - 1
                ),
            ))
        }
        (DeviceArg::Cuda(Some(n)), Ok(_)) => vec![n],
        (_, Ok(count)) => (0..count as u32).collect(),
    };
    Ok(CudaSelection {
        ordinals,
        skipped: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling() {
        for (s, want) in [
            ("cpu", DeviceArg::Cpu),
            ("CUDA", DeviceArg::Cuda(None)),
            ("gpu", DeviceArg::Cuda(None)),
            ("cuda:3", DeviceArg::Cuda(Some(3))),
            ("all", DeviceArg::All),
        ] {
            assert_eq!(s.parse::<DeviceArg>(), Ok(want), "{s}");
        }
        for bad in ["", "cuda:", "cuda:x", "cuda:-1", "tpu", "cpu:0"] {
            let err = bad.parse::<DeviceArg>().unwrap_err();
            assert!(err.contains("cpu, cuda, cuda:N or all"), "{bad}: {err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for d in [
            DeviceArg::Cpu,
            DeviceArg::Cuda(None),
            DeviceArg::Cuda(Some(1)),
            DeviceArg::All,
        ] {
            assert_eq!(d.to_string().parse::<DeviceArg>(), Ok(d));
        }
    }

    #[test]
    fn selects_ordinals() {
        let ords = |arg, found| select(arg, found).unwrap().ordinals;
        assert_eq!(ords(DeviceArg::Cuda(None), Ok(2)), vec![0, 1]);
        assert_eq!(ords(DeviceArg::All, Ok(2)), vec![0, 1]);
        assert_eq!(ords(DeviceArg::Cuda(Some(1)), Ok(2)), vec![1]);
        for found in [Err("no driver"), Ok(0)] {
            let s = select(DeviceArg::All, found).unwrap();
            assert!(s.ordinals.is_empty());
            assert!(s.skipped.is_some());
        }
    }

    #[test]
    fn asking_for_missing_cuda_is_an_error_naming_the_option() {
        for (arg, found) in [
            (DeviceArg::Cuda(None), Err("no CUDA driver found")),
            (DeviceArg::Cuda(None), Ok(0)),
            (DeviceArg::Cuda(Some(0)), Err("no CUDA driver found")),
            (DeviceArg::Cuda(Some(2)), Ok(2)),
        ] {
            let e = select(arg, found).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::DeviceUnavailable);
            assert!(e.message().contains(&format!("--device {arg}")), "{e}");
            assert!(e.message().contains("CUDA"), "{e}");
        }
    }

    #[test]
    fn cpu_never_asks_the_driver() {
        let ctx = Context::new().unwrap();
        let s = cuda_ordinals(&ctx, DeviceArg::Cpu).unwrap();
        assert!(s.ordinals.is_empty() && s.skipped.is_none());
    }
}
