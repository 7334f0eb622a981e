//! `vfio-workload`: the device's own engines left running: the page writer stamping guest
//! pages (device DMA into RAM that the guest CPU never writes) and the VRAM kernel filling a
//! VRAM range pass after pass; and the guest CPU writing VRAM through the BAR (`cpu_writer`).
//! Any of them may run at once. Stop checks what they left.

use std::time::Instant;

use super::cpu_writer::{self, CpuWriter};
use super::regs::*;
use super::session::{Session, WAIT};
use crate::pagemap::{longest_run, DmaBuffer};

/// Pages the page writer's window may span: the longest physically contiguous run found in a
/// buffer of `WINDOW_SEARCH` times as many pages (the device writes a contiguous IOVA range).
pub const WINDOW_PAGES: usize = 256;
const WINDOW_SEARCH: usize = 4;
/// The VRAM range the kernel fills: the first MiB (or all of a smaller VRAM).
pub const KERNEL_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The device's page writer: DMA into guest RAM.
    Dma,
    /// The device's kernel filling the first MiB of VRAM.
    Vram,
    /// An agent thread writing the second MiB of VRAM through the BAR mmap.
    VramCpu,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Dma, Kind::Vram, Kind::VramCpu];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Dma => "dma",
            Kind::Vram => "vram",
            Kind::VramCpu => "vram-cpu",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

pub struct Pages {
    buf: DmaBuffer,
    /// The buffer pages the window covers, in IOVA order.
    window: Vec<usize>,
    started: Instant,
}

pub struct Kernel {
    len: u64,
    pattern: u32,
    started: Instant,
}

/// The workloads running on one device: one of each kind, so the device's DMA into RAM, its
/// kernel and the guest's own VRAM writes can all run at once (what a migration must carry).
#[derive(Default)]
pub struct Workloads {
    pub pages: Option<Pages>,
    pub kernel: Option<Kernel>,
    pub cpu: Option<CpuWriter>,
}

impl Workloads {
    fn running(&self, kind: Kind) -> bool {
        match kind {
            Kind::Dma => self.pages.is_some(),
            Kind::Vram => self.kernel.is_some(),
            Kind::VramCpu => self.cpu.is_some(),
        }
    }
}

/// What the page writer leaves in window page `k` of `pages` after `written` writes: the
/// sequence number of the last write to it (writes go round the window from 1) and the magic;
/// zeros if it was never written.
pub fn expected_stamp(k: u64, pages: u64, written: u64) -> (u64, u64) {
    if pages == 0 || written <= k {
        return (0, 0);
    }
    (k + 1 + pages * ((written - 1 - k) / pages), PW_MAGIC)
}

pub fn start(s: &mut Session, kind: Kind, rate: u32) -> Result<String, String> {
    s.require_test_device()?;
    if s.workloads.running(kind) {
        return Err(format!(
            "a {} workload runs on {}: stop it first",
            kind.name(),
            s.bdf()
        ));
    }
    let seed = s.next_seed();
    match kind {
        Kind::Dma => {
            let page = crate::pagemap::page_size();
            let buf = DmaBuffer::new(WINDOW_PAGES * WINDOW_SEARCH * page)?;
            let (first, window) =
                longest_run(buf.pfns(), WINDOW_PAGES).ok_or("no pages in the buffer")?;
            let base = first * page as u64;
            s.write64(PW_BASE_LO, base)?;
            s.write(PW_PAGES, window.len() as u32)?;
            s.write(PW_STRIDE, 1)?;
            s.write(PW_RATE, rate)?;
            s.write(PW_LIMIT, 0)?;
            if let Err(e) = s.write(PW_CTRL, CTRL_START) {
                // Maybe started anyway: the pages must never be reused while it may write.
                std::mem::forget(buf);
                return Err(e);
            }
            let line = format!(
                "vfio-workload {} started=dma pages={} base={base:#x} rate={rate}",
                s.bdf(),
                window.len()
            );
            s.workloads.pages = Some(Pages {
                buf,
                window,
                started: Instant::now(),
            });
            Ok(line)
        }
        Kind::Vram => {
            if rate != 0 {
                return Err("the VRAM kernel takes no rate".into());
            }
            let len = KERNEL_BYTES.min(s.vram_size()?);
            // Odd, and different at each start, so a stale fill never passes.
            let pattern = (seed as u32).wrapping_mul(0x9e37_79b1) | 1;
            s.write64(K_OFFSET_LO, 0)?;
            s.write64(K_LEN_LO, len)?;
            s.write(K_PATTERN, pattern)?;
            s.write(K_CTRL, CTRL_START)?;
            s.workloads.kernel = Some(Kernel {
                len,
                pattern,
                started: Instant::now(),
            });
            Ok(format!(
                "vfio-workload {} started=vram offset=0x0 bytes={len} pattern={pattern:#010x}",
                s.bdf()
            ))
        }
        Kind::VramCpu => {
            let bytes = cpu_writer::PAGES * cpu_writer::PAGE;
            let vram = s.vram_size()?;
            if cpu_writer::OFFSET + bytes > vram {
                return Err(format!(
                    "VRAM of {vram} bytes has no room for the writer's range at {:#x}",
                    cpu_writer::OFFSET
                ));
            }
            let map = s.dev.map(&s.vram, cpu_writer::OFFSET, bytes as usize)?;
            s.workloads.cpu = Some(CpuWriter::start(map, rate)?);
            Ok(format!(
                "vfio-workload {} started=vram-cpu offset={:#x} pages={} rate={rate}",
                s.bdf(),
                cpu_writer::OFFSET,
                cpu_writer::PAGES
            ))
        }
    }
}

/// Stops the workload of `kind`, or every running one (`None`): one result per workload, a
/// failed check being an `ok=false` line and a device that does not answer an error.
pub fn stop(s: &mut Session, kind: Option<Kind>) -> Vec<Result<String, String>> {
    let kinds: Vec<Kind> = match kind {
        Some(k) if s.workloads.running(k) => vec![k],
        Some(k) => return vec![Err(format!("no {} workload runs on {}", k.name(), s.bdf()))],
        None => Kind::ALL
            .into_iter()
            .filter(|&k| s.workloads.running(k))
            .collect(),
    };
    if kinds.is_empty() {
        return vec![Err(format!("no workload runs on {}", s.bdf()))];
    }
    kinds
        .into_iter()
        .map(|k| match k {
            Kind::Dma => stop_pages(s),
            Kind::Vram => stop_kernel(s),
            Kind::VramCpu => stop_cpu(s),
        })
        .collect()
}

fn stop_pages(s: &mut Session) -> Result<String, String> {
    let Pages {
        buf,
        window,
        started,
    } = s.workloads.pages.take().ok_or("no page writer")?;
    if let Err(e) = s.write(PW_CTRL, CTRL_STOP) {
        // It may still be writing: the pages must never be reused.
        std::mem::forget(buf);
        return Err(e);
    }
    let ms = started.elapsed().as_millis();
    let status = s.read(PW_STATUS)?;
    let written = s.read64(PW_WRITTEN_LO)?;
    if status != STATUS_DONE {
        return Err(format!(
            "page writer status {status:#x} ({}) after {written} writes",
            status_name(status)
        ));
    }
    buf.check_frames()?;
    let pages = window.len() as u64;
    let page = buf.page_bytes();
    let mut bad = Vec::new();
    for (k, &p) in window.iter().enumerate() {
        let got = (buf.read_u64(p * page), buf.read_u64(p * page + 8));
        let (seq, magic) = expected_stamp(k as u64, pages, written);
        if got != (Some(seq), Some(magic)) {
            bad.push((k, got, seq));
        }
    }
    let head = format!(
        "vfio-workload {} stopped=dma written={written} pages={pages}",
        s.bdf()
    );
    Ok(match bad.first() {
        None => format!("{head} ok=true ms={ms}"),
        // A lost stamp: the page holds an older write (or none) than the device's count says.
        Some((k, (seq, magic), want)) => format!(
            "{head} ok=false bad_pages={} first_bad_page={k} seq={} want_seq={want} \
             magic_ok={} ms={ms}",
            bad.len(),
            seq.unwrap_or(0),
            *magic == Some(PW_MAGIC)
        ),
    })
}

fn stop_kernel(s: &mut Session) -> Result<String, String> {
    let Kernel {
        len,
        pattern,
        started,
    } = s.workloads.kernel.take().ok_or("no kernel")?;
    // A stop mid-way through the first pass would leave old VRAM behind it.
    let deadline = Instant::now() + WAIT;
    while s.read(K_PASSES)? == 0 && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    s.write(K_CTRL, CTRL_STOP)?;
    let ms = started.elapsed().as_millis();
    let status = s.read(K_STATUS)?;
    let passes = s.read(K_PASSES)?;
    if status != STATUS_DONE || passes == 0 {
        return Err(format!(
            "VRAM kernel status {status:#x} ({}) after {passes} passes",
            status_name(status)
        ));
    }
    let bytes = usize::try_from(len).map_err(|_| "bad length")?;
    let map = s.dev.map(&s.vram, 0, bytes)?;
    let word = u64::from(pattern) << 32 | u64::from(pattern);
    let bad = (0..bytes / 8)
        .filter(|&i| map.read_u64(8 * i) != word)
        .count();
    let head = format!(
        "vfio-workload {} stopped=vram passes={passes} bytes={len} pattern={pattern:#010x}",
        s.bdf()
    );
    Ok(if bad == 0 {
        format!("{head} ok=true ms={ms}")
    } else {
        format!("{head} ok=false bad_words={bad} of={} ms={ms}", bytes / 8)
    })
}

fn stop_cpu(s: &mut Session) -> Result<String, String> {
    let writer = s.workloads.cpu.take().ok_or("no VRAM writer")?;
    let started = writer.started;
    let rate = writer.rate;
    let (map, record) = writer.stop()?;
    let ms = started.elapsed().as_millis();
    let c = cpu_writer::check(&record, |p, w| {
        map.read_u64((p as u64 * cpu_writer::PAGE + 8 * w) as usize)
    });
    let head = format!(
        "vfio-workload {} stopped=vram-cpu writes={} pages={} rate={rate}",
        s.bdf(),
        record.writes,
        record.last.len()
    );
    Ok(match c.first_bad {
        None => format!("{head} ok=true ms={ms}"),
        Some((p, got)) => format!(
            "{head} ok=false bad_pages={} first_bad_page={p} word0={got:#x} ms={ms}",
            c.bad_pages
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicts_the_page_writers_stamps() {
        // 3 pages, 7 writes: page 0 got writes 1, 4, 7; page 1 got 2, 5; page 2 got 3, 6.
        assert_eq!(expected_stamp(0, 3, 7), (7, PW_MAGIC));
        assert_eq!(expected_stamp(1, 3, 7), (5, PW_MAGIC));
        assert_eq!(expected_stamp(2, 3, 7), (6, PW_MAGIC));
        // Fewer writes than pages: the rest were never touched.
        assert_eq!(expected_stamp(1, 3, 1), (0, 0));
        assert_eq!(expected_stamp(0, 3, 1), (1, PW_MAGIC));
        assert_eq!(expected_stamp(0, 3, 0), (0, 0));
        assert_eq!(expected_stamp(0, 0, 5), (0, 0));
    }
}
