//! The `vfio-*` commands: the guest drives a passed-through gpu-test-device from user space
//! through vfio-pci in no-IOMMU mode (see the crate docs for each command's output).
//!
//! A device is opened on its first use and stays open for the agent's life: a VFIO group opens
//! once, and a running workload needs its buffer and eventfds kept.

mod bench;
mod cpu_writer;
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
    Dma {
        bdf: Bdf,
        bytes: u64,
    },
    Vram {
        bdf: Bdf,
        offset: u64,
        bytes: u64,
    },
    Msix {
        bdf: Bdf,
        count: u64,
    },
    Bench {
        bdf: Bdf,
        iterations: u64,
    },
    WorkloadStart {
        bdf: Bdf,
        kind: Kind,
        rate: u32,
    },
    /// Stops one kind, or every running workload.
    WorkloadStop {
        bdf: Bdf,
        kind: Option<Kind>,
    },
}

impl GpuCommand {
    pub fn name(&self) -> &'static str {
        match self {
            GpuCommand::Bind(_) => "vfio-bind",
            GpuCommand::Dma { .. } => "vfio-dma",
            GpuCommand::Vram { .. } => "vfio-vram",
            GpuCommand::Msix { .. } => "vfio-msix",
            GpuCommand::Bench { .. } => "vfio-bench",
            GpuCommand::WorkloadStart { .. } | GpuCommand::WorkloadStop { .. } => "vfio-workload",
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
        "vfio-workload" => "BDF,start,dma|vram|vram-cpu[,RATE] or BDF,stop[,dma|vram|vram-cpu]",
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
            Some("stop") => {
                let kind = match args.get(2) {
                    None => None,
                    Some(k) if args.len() == 3 => Some(Kind::parse(k).ok_or_else(|| {
                        format!("unknown workload {k:?} (dma, vram or vram-cpu)")
                    })?),
                    Some(_) => return Err(bad_usage()),
                };
                GpuCommand::WorkloadStop { bdf, kind }
            }
            Some("start") => {
                if !(3..=4).contains(&args.len()) {
                    return Err(bad_usage());
                }
                let kind = Kind::parse(args[2]).ok_or_else(|| {
                    format!("unknown workload {:?} (dma, vram or vram-cpu)", args[2])
                })?;
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

    /// Runs one command: the text of each of its `AGENT:` lines (one, except for a stop of
    /// several workloads), or the reason it failed.
    pub fn run(&mut self, cmd: GpuCommand) -> Vec<Result<String, String>> {
        let one = match cmd {
            GpuCommand::WorkloadStop { bdf, kind } => {
                return match self.session(&bdf) {
                    Ok(s) => workload::stop(s, kind),
                    Err(e) => vec![Err(e)],
                }
            }
            GpuCommand::Bind(bdf) => bind(&Paths::system(), &bdf).map(|b| {
                format!(
                    "vfio-bind {bdf} driver=vfio-pci group={} previous={}",
                    b.group.display(),
                    b.previous.as_deref().unwrap_or("none")
                )
            }),
            GpuCommand::Dma { bdf, bytes } => self
                .session(&bdf)
                .and_then(|s| ops::dma_round_trip(s, bytes)),
            GpuCommand::Vram { bdf, offset, bytes } => self
                .session(&bdf)
                .and_then(|s| ops::vram_check(s, offset, bytes)),
            GpuCommand::Msix { bdf, count } => self.session(&bdf).and_then(|s| ops::msix(s, count)),
            GpuCommand::Bench { bdf, iterations } => {
                self.session(&bdf).and_then(|s| bench::bench(s, iterations))
            }
            GpuCommand::WorkloadStart { bdf, kind, rate } => self
                .session(&bdf)
                .and_then(|s| workload::start(s, kind, rate)),
        };
        vec![one]
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
            GpuCommand::WorkloadStop {
                bdf: bdf(),
                kind: None
            }
        );
        assert_eq!(
            ok("vfio-workload", &["00:01.0", "start", "vram-cpu", "500"]),
            GpuCommand::WorkloadStart {
                bdf: bdf(),
                kind: Kind::VramCpu,
                rate: 500
            }
        );
        for kind in Kind::ALL {
            assert_eq!(
                ok("vfio-workload", &["00:01.0", "stop", kind.name()]),
                GpuCommand::WorkloadStop {
                    bdf: bdf(),
                    kind: Some(kind)
                }
            );
        }
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
        assert!(err("vfio-workload", &["00:01.0", "stop", "x"]).contains("unknown workload"));
        assert!(err("vfio-workload", &["00:01.0", "stop", "dma", "x"]).contains("takes"));
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
            GpuCommand::WorkloadStop {
                bdf: missing.clone(),
                kind: None,
            },
        ] {
            let results = gpus.run(cmd);
            assert_eq!(results.len(), 1, "{results:?}");
            let err = results[0].clone().expect_err("no such device");
            assert!(err.contains("ffff:ff:1f.7"), "{err}");
        }
    }
}
