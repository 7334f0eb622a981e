//! The `vfio-*` commands: the guest drives a passed-through gpu-test-device from user space
//! through vfio-pci in no-IOMMU mode (see the crate docs for each command's output).
//!
//! A device is opened on its first use and stays open for the agent's life: a VFIO group opens
//! once, and a running workload needs its buffer and eventfds kept.

mod bench;
mod ops;
mod regs;
mod session;
mod stats;
mod workload;

use std::collections::HashMap;

use crate::pci::Bdf;
use crate::script::parse_u64;
use crate::vfio::bind::{bind, Paths};
use session::Session;
pub use workload::Kind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuCommand {
    Bind(Bdf),
    Dma { bdf: Bdf, bytes: u64 },
    Vram { bdf: Bdf, offset: u64, bytes: u64 },
    Msix { bdf: Bdf, count: u64 },
    Bench { bdf: Bdf, iterations: u64 },
    WorkloadStart { bdf: Bdf, kind: Kind, rate: u32 },
    WorkloadStop(Bdf),
}

impl GpuCommand {
    pub fn name(&self) -> &'static str {
        match self {
            GpuCommand::Bind(_) => "vfio-bind",
            GpuCommand::Dma { .. } => "vfio-dma",
            GpuCommand::Vram { .. } => "vfio-vram",
            GpuCommand::Msix { .. } => "vfio-msix",
            GpuCommand::Bench { .. } => "vfio-bench",
            GpuCommand::WorkloadStart { .. } | GpuCommand::WorkloadStop(_) => "vfio-workload",
        }
    }
}

/// Parses the arguments of a `vfio-*` command (`name` included).
pub fn parse(name: &str, args: &[&str]) -> Result<GpuCommand, String> {
    let usage = match name {
        "vfio-bind" => "BDF",
        "vfio-dma" => "BDF,BYTES",
        "vfio-vram" => "BDF,OFFSET,BYTES",
        "vfio-msix" => "BDF,COUNT",
        "vfio-bench" => "BDF[,ITERATIONS]",
        "vfio-workload" => "BDF,start,dma|vram[,RATE] or BDF,stop",
        _ => return Err("unknown command".into()),
    };
    let bad_usage = || format!("takes {usage}, got {} argument(s)", args.len());
    let num = |i: usize, what: &str| -> Result<u64, String> {
        let arg = args.get(i).ok_or_else(bad_usage)?;
        parse_u64(arg).ok_or_else(|| format!("bad {what} {arg:?}"))
    };
    let want = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(bad_usage())
        }
    };
    let bdf = Bdf::parse(args.first().ok_or_else(bad_usage)?)?;
    Ok(match name {
        "vfio-bind" => want(1).map(|()| GpuCommand::Bind(bdf))?,
        "vfio-dma" => {
            want(2)?;
            GpuCommand::Dma {
                bdf,
                bytes: num(1, "BYTES")?,
            }
        }
        "vfio-vram" => {
            want(3)?;
            GpuCommand::Vram {
                bdf,
                offset: num(1, "OFFSET")?,
                bytes: num(2, "BYTES")?,
            }
        }
        "vfio-msix" => {
            want(2)?;
            GpuCommand::Msix {
                bdf,
                count: num(1, "COUNT")?,
            }
        }
        "vfio-bench" => {
            if !(1..=2).contains(&args.len()) {
                return Err(bad_usage());
            }
            let iterations = if args.len() == 2 {
                num(1, "ITERATIONS")?
            } else {
                bench::DEFAULT_ITERATIONS
            };
            GpuCommand::Bench { bdf, iterations }
        }
        _ => match args.get(1).copied() {
            Some("stop") => want(2).map(|()| GpuCommand::WorkloadStop(bdf))?,
            Some("start") => {
                if !(3..=4).contains(&args.len()) {
                    return Err(bad_usage());
                }
                let kind = match args[2] {
                    "dma" => Kind::Dma,
                    "vram" => Kind::Vram,
                    other => return Err(format!("unknown workload {other:?} (dma or vram)")),
                };
                let rate = if args.len() == 4 { num(3, "RATE")? } else { 0 };
                let rate = u32::try_from(rate).map_err(|_| format!("RATE {rate} too large"))?;
                GpuCommand::WorkloadStart { bdf, kind, rate }
            }
            _ => return Err(bad_usage()),
        },
    })
}

/// The devices opened so far.
#[derive(Default)]
pub struct Gpus {
    sessions: HashMap<Bdf, Session>,
}

impl Gpus {
    fn session(&mut self, bdf: &Bdf) -> Result<&mut Session, String> {
        if !self.sessions.contains_key(bdf) {
            let session = Session::open(bdf)?;
            self.sessions.insert(bdf.clone(), session);
        }
        self.sessions
            .get_mut(bdf)
            .ok_or_else(|| format!("{bdf}: session lost"))
    }

    /// Runs one command: the text of its `AGENT:` line, or the reason it failed.
    pub fn run(&mut self, cmd: GpuCommand) -> Result<String, String> {
        match cmd {
            GpuCommand::Bind(bdf) => bind(&Paths::system(), &bdf).map(|b| {
                format!(
                    "vfio-bind {bdf} driver=vfio-pci group={} previous={}",
                    b.group.display(),
                    b.previous.as_deref().unwrap_or("none")
                )
            }),
            GpuCommand::Dma { bdf, bytes } => ops::dma_round_trip(self.session(&bdf)?, bytes),
            GpuCommand::Vram { bdf, offset, bytes } => {
                ops::vram_check(self.session(&bdf)?, offset, bytes)
            }
            GpuCommand::Msix { bdf, count } => ops::msix(self.session(&bdf)?, count),
            GpuCommand::Bench { bdf, iterations } => bench::bench(self.session(&bdf)?, iterations),
            GpuCommand::WorkloadStart { bdf, kind, rate } => {
                workload::start(self.session(&bdf)?, kind, rate)
            }
            GpuCommand::WorkloadStop(bdf) => workload::stop(self.session(&bdf)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bdf() -> Bdf {
        Bdf::parse("0000:00:01.0").expect("bdf")
    }

    #[test]
    fn parses_every_vfio_command() {
        let ok = |name: &str, args: &[&str]| parse(name, args).expect(name);
        assert_eq!(ok("vfio-bind", &["00:01.0"]), GpuCommand::Bind(bdf()));
        assert_eq!(
            ok("vfio-dma", &["0000:00:01.0", "0x10000"]),
            GpuCommand::Dma {
                bdf: bdf(),
                bytes: 65536
            }
        );
        assert_eq!(
            ok("vfio-vram", &["00:01.0", "4096", "8"]),
            GpuCommand::Vram {
                bdf: bdf(),
                offset: 4096,
                bytes: 8
            }
        );
        assert_eq!(
            ok("vfio-msix", &["00:01.0", "16"]),
            GpuCommand::Msix {
                bdf: bdf(),
                count: 16
            }
        );
        assert_eq!(
            ok("vfio-bench", &["00:01.0"]),
            GpuCommand::Bench {
                bdf: bdf(),
                iterations: bench::DEFAULT_ITERATIONS
            }
        );
        assert_eq!(
            ok("vfio-bench", &["00:01.0", "0x10"]),
            GpuCommand::Bench {
                bdf: bdf(),
                iterations: 16
            }
        );
        assert_eq!(
            ok("vfio-workload", &["00:01.0", "start", "dma", "1000"]),
            GpuCommand::WorkloadStart {
                bdf: bdf(),
                kind: Kind::Dma,
                rate: 1000
            }
        );
        assert_eq!(
            ok("vfio-workload", &["00:01.0", "start", "vram"]),
            GpuCommand::WorkloadStart {
                bdf: bdf(),
                kind: Kind::Vram,
                rate: 0
            }
        );
        assert_eq!(
            ok("vfio-workload", &["00:01.0", "stop"]),
            GpuCommand::WorkloadStop(bdf())
        );
    }

    #[test]
    fn reports_bad_vfio_commands() {
        let err = |name: &str, args: &[&str]| parse(name, args).expect_err(name);
        assert_eq!(err("vfio-frob", &["00:01.0"]), "unknown command");
        assert_eq!(err("vfio-bind", &[]), "takes BDF, got 0 argument(s)");
        assert!(err("vfio-bind", &["00:01"]).contains("bad PCI address"));
        assert!(err("vfio-bind", &["../../x"]).contains("bad PCI address"));
        assert_eq!(
            err("vfio-dma", &["00:01.0"]),
            "takes BDF,BYTES, got 1 argument(s)"
        );
        assert_eq!(err("vfio-dma", &["00:01.0", "1k"]), "bad BYTES \"1k\"");
        assert_eq!(
            err("vfio-bench", &["00:01.0", "1", "2"]),
            "takes BDF[,ITERATIONS], got 3 argument(s)"
        );
        assert_eq!(err("vfio-bench", &["00:01.0", "x"]), "bad ITERATIONS \"x\"");
        assert!(err("vfio-workload", &["00:01.0", "start", "gpu"]).contains("unknown workload"));
        assert!(err("vfio-workload", &["00:01.0", "start", "dma", "1", "2"]).contains("takes"));
        assert!(err("vfio-workload", &["00:01.0", "pause"]).contains("takes"));
        assert!(err("vfio-workload", &["00:01.0", "stop", "x"]).contains("takes"));
        assert!(
            err("vfio-workload", &["00:01.0", "start", "dma", "0x100000000"]).contains("too large")
        );
    }

    #[test]
    fn a_missing_device_is_an_error_not_a_crash() {
        let mut gpus = Gpus::default();
        let missing = Bdf::parse("ffff:ff:1f.7").expect("bdf");
        for cmd in [
            GpuCommand::Bind(missing.clone()),
            GpuCommand::Dma {
                bdf: missing.clone(),
                bytes: 4096,
            },
            GpuCommand::Msix {
                bdf: missing.clone(),
                count: 1,
            },
            GpuCommand::Bench {
                bdf: missing.clone(),
                iterations: 1,
            },
            GpuCommand::WorkloadStop(missing.clone()),
        ] {
            let err = gpus.run(cmd).expect_err("no such device");
            assert!(err.contains("ffff:ff:1f.7"), "{err}");
        }
    }
}
