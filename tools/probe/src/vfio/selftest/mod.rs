//! `vmm-probe --vfio-selftest` (and the lab guest's init, before the probe): the VMM's kernel-VFIO
//! transport (`devices::vfio::open` + `KernelTransport`, the code `vmm run --device vfio:` uses)
//! driven against the kernel's sample mediated device `mtty` (samples/vfio-mdev/mtty.c, built into
//! the lab kernel). mtty needs no hardware and no IOMMU: its group is emulated, so the type1
//! container and DMA map work, and it implements VFIO migration v2 (STOP_COPY and PRE_COPY) and
//! the DMA-logging callbacks (which log nothing: mtty does no DMA; the report also needs the
//! kernel's iova_bitmap, built only with CONFIG_IOMMUFD_DRIVER).
//!
//! Each step prints one line, `VFIO-STEP <name>: ok | <evidence>`, `... refused errno=<n> (<NAME>)
//! | <what>` (the kernel said no), `... failed | <why>` (no errno: a check on the data failed) or
//! `... skipped | <why>` (an earlier step it needs did not succeed). The lines are framed between
//! [`BEGIN`] and [`END`] on the console; tools/probe/tests/lab_guest.rs parses them.
//!
//! Here: the step lines, their outcomes and the run; opened.rs: the steps on the device opened
//! either way (group + type1, cdev + iommufd: regions, IRQs, DMA, migration, DMA logging);
//! mtty.rs: what is mtty's own (its serial-port registers, the IRQ it raises, the port state
//! carried across a migration).

use std::error::Error;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{chain, errno_of};
use crate::report::errno_name;

mod mtty;
mod opened;

pub const BEGIN: &str = "VMM-VFIO-SELFTEST-BEGIN";
pub const END: &str = "VMM-VFIO-SELFTEST-END";
/// The prefix of every step line.
pub const STEP: &str = "VFIO-STEP ";

/// The mdev type: one serial port (BAR0, 8 I/O registers).
const MTTY_TYPE: &str = "mtty-1";
/// Fixed instance names: the lab guest boots fresh each time; elsewhere a leftover instance of
/// the same name is removed first.
const UUID_SRC: &str = "0c9e5a1e-16b0-4a7c-9d1e-000000000001";
const UUID_DST: &str = "0c9e5a1e-16b0-4a7c-9d1e-000000000002";

type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok(String),
    Refused { errno: i32, what: String },
    Failed(String),
    Skipped(String),
}

impl Outcome {
    fn of(r: Result<String, BoxError>) -> Self {
        match r {
            Ok(evidence) => Outcome::Ok(evidence),
            Err(e) => match errno_of(e.as_ref()) {
                Some(errno) => Outcome::Refused {
                    errno,
                    what: chain(e.as_ref()),
                },
                None => Outcome::Failed(chain(e.as_ref())),
            },
        }
    }
}

/// One step's line as the guest prints it.
pub fn line(name: &str, outcome: &Outcome) -> String {
    let one_line = |s: &str| s.replace('\n', " ");
    match outcome {
        Outcome::Ok(ev) => format!("{STEP}{name}: ok | {}", one_line(ev)),
        Outcome::Refused { errno, what } => format!(
            "{STEP}{name}: refused errno={errno} ({}) | {}",
            errno_name(*errno),
            one_line(what)
        ),
        Outcome::Failed(why) => format!("{STEP}{name}: failed | {}", one_line(why)),
        Outcome::Skipped(why) => format!("{STEP}{name}: skipped | {}", one_line(why)),
    }
}

/// A parsed step line: its name, its outcome word (`ok`, `refused`, `failed`, `skipped`), the
/// errno of a refusal, and the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedStep {
    pub name: String,
    pub outcome: String,
    pub errno: Option<i32>,
    pub detail: String,
}

/// Parses a line [`line`] printed; `None` for any other line.
pub fn parse(l: &str) -> Option<ParsedStep> {
    let rest = l.trim_end_matches('\r').strip_prefix(STEP)?;
    let (name, rest) = rest.split_once(": ")?;
    let (head, detail) = rest.split_once(" | ").unwrap_or((rest, ""));
    let mut words = head.split_whitespace();
    let outcome = words.next()?.to_string();
    let errno = words
        .next()
        .and_then(|w| w.strip_prefix("errno="))
        .and_then(|n| n.parse().ok());
    Some(ParsedStep {
        name: name.to_string(),
        outcome,
        errno,
        detail: detail.to_string(),
    })
}

struct Printer<'a, W: Write> {
    out: &'a mut W,
}

impl<W: Write> Printer<'_, W> {
    /// Runs a step, prints its line, returns its value when it succeeded.
    fn step<T>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> Result<(T, String), BoxError>,
    ) -> Option<T> {
        let (value, outcome) = match f() {
            Ok((v, ev)) => (Some(v), Outcome::Ok(ev)),
            Err(e) => (None, Outcome::of(Err(e))),
        };
        self.print(name, &outcome);
        value
    }

    fn skip(&mut self, name: &str, why: &str) {
        self.print(name, &Outcome::Skipped(why.to_string()));
    }

    fn print(&mut self, name: &str, outcome: &Outcome) {
        let _ = writeln!(self.out, "{}", line(name, outcome));
        let _ = self.out.flush();
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), BoxError> {
    if ok {
        Ok(())
    } else {
        Err(what().into())
    }
}

/// The mdev type directory of `ty` under any parent of /sys/class/mdev_bus.
fn find_type(sys: &Path, ty: &str) -> Result<PathBuf, BoxError> {
    let bus = sys.join("class/mdev_bus");
    let parents =
        std::fs::read_dir(&bus).map_err(|e| Box::new(PathError(bus.clone(), e)) as BoxError)?;
    for p in parents.flatten() {
        let dir = p.path().join("mdev_supported_types").join(ty);
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    Err(format!("no mdev type {ty} under {}", bus.display()).into())
}

fn read_trim(p: &Path) -> Result<String, BoxError> {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|e| Box::new(PathError(p.to_path_buf(), e)) as BoxError)
}

fn write_sysfs(p: &Path, what: &str) -> Result<(), BoxError> {
    std::fs::write(p, what).map_err(|e| Box::new(PathError(p.to_path_buf(), e)) as BoxError)
}

/// An I/O error with the file it happened on (the errno stays reachable as its source).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.display())]
struct PathError(PathBuf, #[source] std::io::Error);

/// Creates instance `uuid` of the type at `ty`; returns its sysfs directory and IOMMU group.
fn create(sys: &Path, ty: &Path, uuid: &str) -> Result<(PathBuf, u32), BoxError> {
    let dev = sys.join("bus/mdev/devices").join(uuid);
    if dev.exists() {
        write_sysfs(&dev.join("remove"), "1")?;
    }
    write_sysfs(&ty.join("create"), uuid)?;
    let link = std::fs::read_link(dev.join("iommu_group"))
        .map_err(|e| Box::new(PathError(dev.join("iommu_group"), e)) as BoxError)?;
    let group = link
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| {
            format!(
                "{}: unreadable group link {}",
                dev.display(),
                link.display()
            )
        })?;
    Ok((dev, group))
}

/// Runs every step against two fresh mtty instances under `sys` (normally /sys), printing a line
/// per step between [`BEGIN`] and [`END`]. Returns how many steps failed or were refused.
pub fn run(sys: &Path, out: &mut impl Write) -> usize {
    let _ = writeln!(out, "{BEGIN}");
    let mut lines = Vec::new();
    {
        let mut tee = Tee {
            out: &mut *out,
            lines: &mut lines,
        };
        let mut p = Printer { out: &mut tee };
        steps(sys, &mut p);
    }
    let _ = writeln!(out, "{END}");
    let _ = out.flush();
    lines
        .iter()
        .filter_map(|l| parse(l))
        .filter(|s| s.outcome == "failed" || s.outcome == "refused")
        .count()
}

/// Writes through, keeping the lines for the count.
struct Tee<'a, W: Write> {
    out: &'a mut W,
    lines: &'a mut Vec<String>,
}

impl<W: Write> Write for Tee<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let s = String::from_utf8_lossy(buf);
        self.lines.extend(s.lines().map(str::to_string));
        self.out.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn steps<W: Write>(sys: &Path, p: &mut Printer<'_, W>) {
    let Some(ty) = p.step("mdev-type", || {
        let ty = find_type(sys, MTTY_TYPE)?;
        let avail = read_trim(&ty.join("available_instances"))?;
        let ev = format!("{} (available_instances {avail})", ty.display());
        Ok((ty, ev))
    }) else {
        return;
    };
    let Some((src_dev, src_group)) = p.step("mdev-create", || {
        let (dev, group) = create(sys, &ty, UUID_SRC)?;
        let (dst, dst_group) = create(sys, &ty, UUID_DST)?;
        let ev = format!(
            "{} (group {group}) and {} (group {dst_group})",
            dev.display(),
            dst.display()
        );
        Ok(((dev, group), ev))
    }) else {
        return;
    };
    let dst_dev = sys.join("bus/mdev/devices").join(UUID_DST);

    opened::group_steps(p, &src_dev, src_group, &dst_dev);
    opened::cdev_steps(p, &src_dev);

    p.step("mdev-remove", || {
        for uuid in [UUID_SRC, UUID_DST] {
            write_sysfs(&sys.join("bus/mdev/devices").join(uuid).join("remove"), "1")?;
        }
        Ok(((), "both instances removed".to_string()))
    });
    // Bad input: an instance removed through sysfs while held (vanish.rs).
    p.step("mdev-vanish", || {
        super::vanish::run(sys)
            .map(|ev| ((), ev))
            .map_err(|e| Box::new(e) as BoxError)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_prints_a_line_that_parses_back() {
        let cases = [
            (Outcome::Ok("a | b".into()), "ok", None),
            (
                Outcome::Refused {
                    errno: libc::ENOTTY,
                    what: "x\ny".into(),
                },
                "refused",
                Some(libc::ENOTTY),
            ),
            (Outcome::Failed("no".into()), "failed", None),
            (Outcome::Skipped("why".into()), "skipped", None),
        ];
        for (o, word, errno) in cases {
            let l = line("irq-msi", &o);
            assert!(!l.contains('\n'), "{l}");
            let p = parse(&l).unwrap();
            assert_eq!(p.name, "irq-msi");
            assert_eq!(p.outcome, word, "{l}");
            assert_eq!(p.errno, errno, "{l}");
        }
        assert!(line(
            "s",
            &Outcome::Refused {
                errno: libc::ENOTTY,
                what: String::new()
            }
        )
        .contains("errno=25 (ENOTTY)"));
        assert_eq!(parse("[ 1.0] VFIO-STEP x: ok"), None);
    }

    #[test]
    fn an_error_with_an_errno_is_a_refusal_and_one_without_is_a_failure() {
        let io: BoxError = Box::new(PathError(
            PathBuf::from("/sys/x"),
            std::io::Error::from_raw_os_error(libc::EBUSY),
        ));
        assert!(matches!(
            Outcome::of(Err(io)),
            Outcome::Refused { errno: libc::EBUSY, ref what } if what.contains("/sys/x")
        ));
        assert!(matches!(
            Outcome::of(Err("data differs".into())),
            Outcome::Failed(_)
        ));
    }

    #[test]
    fn without_mdev_bus_the_run_stops_at_the_first_step_and_counts_it() {
        let dir = std::env::temp_dir().join(format!("vmm-selftest-{}", std::process::id()));
        let mut out = Vec::new();
        let bad = run(&dir, &mut out);
        let text = String::from_utf8(out).unwrap();
        let steps: Vec<_> = text.lines().filter_map(parse).collect();
        assert_eq!(steps.len(), 1, "{text}");
        assert_eq!(steps[0].name, "mdev-type");
        assert_eq!(steps[0].errno, Some(libc::ENOENT), "{text}");
        assert_eq!(bad, 1);
        assert!(
            text.starts_with(BEGIN) && text.trim_end().ends_with(END),
            "{text}"
        );
    }
}
