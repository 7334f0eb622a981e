//! Runs the real payload natively in a forked child process and compares what it did with the
//! model. The CPL3 part needs nothing a host process lacks: the mailbox is mapped at its fixed
//! GPA (below `vm.mmap_min_addr`, so this needs CAP_SYS_RAWIO, i.e. root; the tests skip
//! otherwise), the region at its GPA, and each `out` (a #GP without ioperm) lands in a SIGSEGV
//! handler that logs the port and value and steps over it. The CPL0 part cannot run here past
//! its header check (iretq to the guest's selectors), but the bad-header paths can.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use guest_abi::{layout, micro, ports};

use crate::exit_status::*;
use crate::*;

/// The fixed mappings (mailbox, region) are process-wide: one run at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const MAX_EVENTS: usize = 1000;

/// What the child logs, in memory shared with the parent.
#[repr(C)]
struct Log {
    /// Stop (exit code `STOPPED`) after this many MICRO_PASS writes; 0 = never.
    stop_after_passes: u32,
    passes_seen: u32,
    /// After this many MICRO_PASS writes (0 = never), write `new_budget` to the mailbox's
    /// budget, as the VMM's `finish` does while the guest runs.
    budget_after_passes: u32,
    new_budget: u64,
    count: u32,
    events: [(u16, u32); MAX_EVENTS],
    /// RIP and first byte of an instruction that faulted other than `out`.
    fault_rip: u64,
    fault_byte: u8,
}

/// Child exit codes. EXITED: exit port written, then a jump back to that `out` (CPL3);
/// HALTED: exit port, then `hlt` (CPL0).
const EXITED: i32 = 0;
const STOPPED: i32 = 10;
const FAULT: i32 = 11;
const HALTED: i32 = 12;
const LOG_FULL: i32 = 13;

static LOG: AtomicPtr<Log> = AtomicPtr::new(ptr::null_mut());

extern "C" fn on_sigsegv(_sig: i32, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler; LOG points at the
    // shared log page mapped before fork; RIP points into the payload mapping (readable); the
    // mailbox page is mapped (read-write) at its fixed GPA before fork, and the payload is
    // stopped in this handler while its budget field is written.
    unsafe {
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        let gregs = &mut uc.uc_mcontext.gregs;
        let log = &mut *LOG.load(Ordering::Relaxed);
        let rip = gregs[libc::REG_RIP as usize] as u64;
        let byte = *(rip as *const u8);
        match byte {
            0xef => {
                // out %eax, %dx
                let port = gregs[libc::REG_RDX as usize] as u16;
                let value = gregs[libc::REG_RAX as usize] as u32;
                if log.count as usize == MAX_EVENTS {
                    libc::_exit(LOG_FULL);
                }
                log.events[log.count as usize] = (port, value);
                log.count += 1;
                if port == ports::MICRO_EXIT {
                    // The VMM stops here; check what would follow: `jmp` back to the `out` or `hlt`.
                    let next = rip as *const u8;
                    match (*next.add(1), *next.add(2)) {
                        (0xeb, 0xfd) => libc::_exit(EXITED),
                        (0xf4, _) => libc::_exit(HALTED),
                        (other, _) => {
                            log.fault_rip = rip + 1;
                            log.fault_byte = other;
                            libc::_exit(FAULT);
                        }
                    }
                }
                if port == ports::MICRO_PASS {
                    log.passes_seen += 1;
                    if log.passes_seen == log.stop_after_passes {
                        libc::_exit(STOPPED);
                    }
                    if log.passes_seen == log.budget_after_passes {
                        let budget = (layout::MICRO_MAILBOX_GPA + micro::OFF_PASSES) as *mut u64;
                        ptr::write_volatile(budget, log.new_budget);
                    }
                }
                gregs[libc::REG_RIP as usize] += 1;
            }
            _ => {
                log.fault_rip = rip;
                log.fault_byte = byte;
                libc::_exit(FAULT);
            }
        }
    }
}

struct Outcome {
    code: i32,
    events: Vec<(u16, u32)>,
    /// First u64 of each private region page, vCPU 0's region first.
    image: Vec<u64>,
    /// Every u64 of the shared region.
    shared: Vec<u64>,
    current_pass: u64,
    /// Each vCPU's mailbox progress field.
    vcpu_passes: Vec<u64>,
    fault: (u64, u8),
}

/// An anonymous shared mapping, unmapped on drop.
struct Mapping {
    addr: *mut u8,
    len: usize,
}

impl Mapping {
    /// At exactly `addr` (None: the kernel picks); None if that cannot be had.
    fn new(addr: Option<u64>, len: usize) -> Option<Mapping> {
        let mut flags = libc::MAP_SHARED | libc::MAP_ANONYMOUS;
        if addr.is_some() {
            flags |= libc::MAP_FIXED_NOREPLACE;
        }
        let want = addr.unwrap_or(0) as *mut libc::c_void;
        // SAFETY: a fresh anonymous mapping; FIXED_NOREPLACE never replaces an existing one.
        let got =
            unsafe { libc::mmap(want, len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        if got == libc::MAP_FAILED || (addr.is_some() && got != want) {
            return None;
        }
        Some(Mapping {
            addr: got.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Runs the payload from `entry_offset` with `mailbox` and a zeroed region for `w`, as vCPU 0.
/// None when the fixed mappings cannot be made (not root, or the addresses are taken).
fn run(
    w: &Workload,
    mailbox: &[u8; MAILBOX_SIZE],
    entry_offset: usize,
    stop_after_passes: u32,
) -> Option<Outcome> {
    run_vcpus(w, mailbox, entry_offset, stop_after_passes, &[0])
}

/// Like `run`, as each vCPU of `vcpus` in turn (a child each, RSI = the index), on the same
/// memory; stops at the first child that does not exit. Running them one after the other ends
/// in the memory a concurrent run does, as each vCPU writes only its own bytes.
fn run_vcpus(
    w: &Workload,
    mailbox: &[u8; MAILBOX_SIZE],
    entry_offset: usize,
    stop_after_passes: u32,
    vcpus: &[u64],
) -> Option<Outcome> {
    run_vcpus_changing_budget(w, mailbox, entry_offset, stop_after_passes, vcpus, None)
}

/// Like `run_vcpus`; with `change` = (k, budget), the mailbox's budget becomes `budget` right
/// after the k-th pass report (counted over every vCPU), while the payload runs.
fn run_vcpus_changing_budget(
    w: &Workload,
    mailbox: &[u8; MAILBOX_SIZE],
    entry_offset: usize,
    stop_after_passes: u32,
    vcpus: &[u64],
    change: Option<(u32, u64)>,
) -> Option<Outcome> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mb) = Mapping::new(Some(layout::MICRO_MAILBOX_GPA), MAILBOX_SIZE) else {
        eprintln!(
            "skipped: cannot map the mailbox at {:#x} (needs root)",
            layout::MICRO_MAILBOX_GPA
        );
        return None;
    };
    let region_len = (w.private_regions_end() - w.region_gpa()) as usize;
    let Some(region) = Mapping::new(Some(w.region_gpa()), region_len) else {
        eprintln!("skipped: cannot map the region at {:#x}", w.region_gpa());
        return None;
    };
    let shared_len = (w.shared_pages() * PAGE_SIZE) as usize;
    let shared = if shared_len == 0 {
        None
    } else {
        let Some(m) = Mapping::new(Some(w.shared_gpa()), shared_len) else {
            eprintln!(
                "skipped: cannot map the shared region at {:#x}",
                w.shared_gpa()
            );
            return None;
        };
        Some(m)
    };
    let code = Mapping::new(None, PAYLOAD.len()).expect("map code");
    let log_map = Mapping::new(None, std::mem::size_of::<Log>()).expect("map log");
    // SAFETY: the mappings are at least as large as what is copied, and private to this test.
    unsafe {
        ptr::copy_nonoverlapping(mailbox.as_ptr(), mb.addr, MAILBOX_SIZE);
        ptr::copy_nonoverlapping(PAYLOAD.as_ptr(), code.addr, PAYLOAD.len());
        assert_eq!(
            libc::mprotect(
                code.addr.cast(),
                code.len,
                libc::PROT_READ | libc::PROT_EXEC
            ),
            0
        );
        (*log_map.addr.cast::<Log>()).stop_after_passes = stop_after_passes;
        if let Some((after, budget)) = change {
            (*log_map.addr.cast::<Log>()).budget_after_passes = after;
            (*log_map.addr.cast::<Log>()).new_budget = budget;
        }
    }
    LOG.store(log_map.addr.cast(), Ordering::Relaxed);
    let entry = code.addr as usize + entry_offset;

    let mut exit_code = EXITED;
    for &vcpu in vcpus {
        exit_code = run_child(entry, vcpu);
        if exit_code != EXITED {
            break;
        }
    }

    // SAFETY: the child is gone; the shared mappings hold what it wrote.
    let log = unsafe { &*log_map.addr.cast::<Log>() };
    let image = (0..region_len / PAGE_SIZE as usize)
        // SAFETY: inside the region mapping.
        .map(|page| unsafe { ptr::read(region.addr.add(page * PAGE_SIZE as usize).cast::<u64>()) })
        .collect();
    let shared = shared.as_ref().map_or_else(Vec::new, |m| {
        (0..shared_len / 8)
            // SAFETY: inside the shared mapping.
            .map(|word| unsafe { ptr::read(m.addr.add(word * 8).cast::<u64>()) })
            .collect()
    });
    // SAFETY: inside the mailbox mapping.
    let field = |off: u64| unsafe { ptr::read(mb.addr.add(off as usize).cast::<u64>()) };
    Some(Outcome {
        code: exit_code,
        events: log.events[..log.count as usize].to_vec(),
        image,
        shared,
        current_pass: field(micro::OFF_CURRENT_PASS),
        vcpu_passes: (0..micro::MAX_VCPUS)
            .map(|v| field(micro::vcpu_pass_offset(v)))
            .collect(),
        fault: (log.fault_rip, log.fault_byte),
    })
}

/// Runs the payload at `entry` in a child process as vCPU `vcpu`; its exit code.
fn run_child(entry: usize, vcpu: u64) -> i32 {
    // SAFETY: the child only installs a handler and jumps into the payload, which never returns:
    // it ends in the handler's _exit. No locks or allocation in between.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: see above; the payload uses only registers, the mappings, its stack and `out`.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsegv as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigaction(libc::SIGSEGV, &sa, ptr::null_mut());
            // RSI: the vCPU index, as the VMM passes it.
            std::arch::asm!("jmp {0}", in(reg) entry, in("rsi") vcpu, options(noreturn));
        }
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("payload did not finish in 20 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}

fn expected_events(passes: u64, exit: Option<u32>) -> Vec<(u16, u32)> {
    let mut events: Vec<_> = (1..=passes)
        .map(|p| (ports::MICRO_PASS, p as u32))
        .collect();
    events.extend(exit.map(|status| (ports::MICRO_EXIT, status)));
    events
}

/// Runs `w` from the CPL3 entry and checks every page, the events and the progress field.
fn check_against_model(w: Workload) {
    let Some(out) = run(&w, &w.mailbox(), USER_ENTRY_OFFSET, 0) else {
        return;
    };
    assert_eq!(out.code, EXITED, "fault at {:#x}", out.fault.0);
    assert_eq!(
        out.events,
        expected_events(w.passes(), Some(EXIT_OK)),
        "{w:?}"
    );
    assert_eq!(out.current_pass, w.passes());
    let expected: Vec<u64> = w
        .final_image()
        .expect("finite")
        .iter()
        .map(|v| v.unwrap_or(0))
        .collect();
    assert_same_image(&out.image, &expected, &w);
}

/// Compares page images, reporting the first difference rather than two huge vectors.
fn assert_same_image(got: &[u64], expected: &[u64], w: &Workload) {
    let bad: Vec<_> = (0..expected.len())
        .filter(|&p| got[p] != expected[p])
        .collect();
    if let Some(&first) = bad.first() {
        panic!(
            "{w:?}: {} pages differ; page {first}: got {:#x}, expected {:#x}",
            bad.len(),
            got[first],
            expected[first]
        );
    }
}

#[test]
fn every_pattern_matches_the_model() {
    let region = 0x1000_0000;
    for (pattern, pages, passes, param) in [
        (Pattern::Sweep, 300, 3, 0),
        (Pattern::Random, 1000, 4, 700),
        (Pattern::Hotset, 997, 5, 2000),
        (Pattern::Hotset, 7, 2, 50),
        (Pattern::Sparse, 1000, 2, 13),
        (Pattern::Sparse, 10, 1, 0),
        (Pattern::Sparse, 10, 1, u64::MAX),
    ] {
        for seed in [0, 0xdead_beef] {
            check_against_model(
                Workload::new(region, pages, pattern, passes, param, seed).expect("valid"),
            );
        }
    }
}

#[test]
fn endless_workload_keeps_passing() {
    let w = Workload::new(0x1000_0000, 64, Pattern::Random, 0, 100, 3).expect("valid");
    let Some(out) = run(&w, &w.mailbox(), USER_ENTRY_OFFSET, 50) else {
        return;
    };
    assert_eq!(out.code, STOPPED);
    assert_eq!(out.events, expected_events(50, None));
    let expected: Vec<u64> = w.image_after(50).iter().map(|v| v.unwrap_or(0)).collect();
    assert_same_image(&out.image, &expected, &w);
}

#[test]
fn bad_mailboxes_exit_with_a_status() {
    let w = Workload::new(0x1000_0000, 4, Pattern::Sweep, 1, 0, 1).expect("valid");
    let field = |mb: &mut [u8; MAILBOX_SIZE], off: u64, v: u64| {
        mb[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes())
    };
    // CPL0 header checks: status out, then hlt.
    let mut mb = w.mailbox();
    field(&mut mb, micro::OFF_MAGIC, 0);
    if let Some(out) = run(&w, &mb, 0, 0) {
        assert_eq!(
            (out.code, out.events),
            (HALTED, vec![(ports::MICRO_EXIT, EXIT_BAD_MAGIC)])
        );
    }
    let mut mb = w.mailbox();
    field(&mut mb, micro::OFF_VERSION, 7);
    if let Some(out) = run(&w, &mb, 0, 0) {
        assert_eq!(
            (out.code, out.events),
            (HALTED, vec![(ports::MICRO_EXIT, EXIT_BAD_VERSION)])
        );
    }
    // CPL3 checks: status out, nothing written.
    let cases = [
        (micro::OFF_PATTERN, 4, EXIT_BAD_PATTERN),
        (micro::OFF_REGION_PAGES, 0, EXIT_BAD_REGION),
        (micro::OFF_REGION_PAGES, (1 << 20) + 1, EXIT_BAD_REGION),
        (micro::OFF_REGION_GPA, 0xffff_f000, EXIT_BAD_REGION),
        (micro::OFF_REGION_GPA, u64::MAX - 0xfff, EXIT_BAD_REGION),
    ];
    for (off, value, status) in cases {
        let mut mb = w.mailbox();
        field(&mut mb, off, value);
        if let Some(out) = run(&w, &mb, USER_ENTRY_OFFSET, 0) {
            assert_eq!(
                (out.code, out.events),
                (EXITED, vec![(ports::MICRO_EXIT, status)]),
                "{off} = {value:#x}"
            );
            assert!(out.image.iter().all(|&v| v == 0));
            assert_eq!(out.current_pass, 0);
        }
    }
    // The last page below 4 GiB is still accepted (then the host sees the write; not here).
}

/// Every vCPU of a 4-vCPU workload with a shared region, run one after the other on the same
/// memory: the private regions and every word of the shared region match the model, each vCPU
/// reports its passes and exit with its index in the port value, and keeps its own progress.
#[test]
fn several_vcpus_match_the_model() {
    let region = 0x1000_0000;
    for (pattern, pages, shared, passes, param) in [
        (Pattern::Random, 200, 3, 3, 500),
        (Pattern::Sweep, 50, 2, 2, 0),
        (Pattern::Hotset, 97, 5, 2, 300),
        (Pattern::Sparse, 100, 4, 2, 3),
    ] {
        let w = Workload::new(region, pages, pattern, passes, param, 9)
            .and_then(|w| w.with_vcpus(4, region + 0x100_0000, shared))
            .expect("valid");
        let Some(out) = run_vcpus(&w, &w.mailbox(), USER_ENTRY_OFFSET, 0, &[0, 1, 2, 3]) else {
            return;
        };
        assert_eq!(out.code, EXITED, "{w:?}: fault at {:#x}", out.fault.0);
        let mut events = Vec::new();
        for vcpu in 0..4 {
            events.extend((1..=passes).map(|p| (ports::MICRO_PASS, micro::port_value(vcpu, p))));
            events.push((ports::MICRO_EXIT, micro::port_value(vcpu, EXIT_OK.into())));
        }
        assert_eq!(out.events, events, "{w:?}");
        assert_eq!(out.current_pass, passes);
        assert_eq!(
            out.vcpu_passes,
            [passes, passes, passes, passes, 0, 0, 0, 0]
        );
        let zero = |image: Vec<Option<u64>>| -> Vec<u64> {
            image.iter().map(|v| v.unwrap_or(0)).collect()
        };
        assert_same_image(&out.image, &zero(w.image_after(passes)), &w);
        assert_same_image(&out.shared, &zero(w.shared_image_after(passes)), &w);
        assert!(
            out.shared.iter().any(|&v| v != 0),
            "{w:?}: the shared region was written"
        );
    }
}

#[test]
fn a_vcpu_beyond_the_count_exits_with_a_status() {
    let w = Workload::new(0x1000_0000, 4, Pattern::Sweep, 1, 0, 1)
        .and_then(|w| w.with_vcpus(2, 0, 0))
        .expect("valid");
    if let Some(out) = run_vcpus(&w, &w.mailbox(), USER_ENTRY_OFFSET, 0, &[2]) {
        assert_eq!(out.code, EXITED);
        assert_eq!(
            out.events,
            [(
                ports::MICRO_EXIT,
                micro::port_value(2, EXIT_BAD_VCPU.into())
            )]
        );
        assert!(out.image.iter().all(|&v| v == 0));
    }
    let mut mb = w.mailbox();
    mb[micro::OFF_VCPUS as usize..][..8].copy_from_slice(&9u64.to_le_bytes());
    if let Some(out) = run_vcpus(&w, &mb, USER_ENTRY_OFFSET, 0, &[0]) {
        assert_eq!(out.events, [(ports::MICRO_EXIT, EXIT_BAD_VCPU)]);
    }
}

/// The budget is read after every pass, not once: an endless run given a budget while it runs
/// (as `vmm remote finish` does) ends after exactly that many passes on every vCPU, with the
/// memory of a run started with that budget; a lower budget ends a finite run early; a budget
/// equal to the pass just reported ends the run right after it.
#[test]
fn a_budget_changed_while_running_ends_the_run_there() {
    let region = 0x1000_0000;
    let zero =
        |image: Vec<Option<u64>>| -> Vec<u64> { image.iter().map(|v| v.unwrap_or(0)).collect() };
    // (initial budget, set after this many pass reports, new budget, vCPUs)
    for (initial, after, budget, vcpus) in [(0, 3, 7, 1), (0, 3, 3, 1), (10, 2, 5, 1), (0, 4, 9, 2)]
    {
        let w = Workload::new(region, 64, Pattern::Random, initial, 100, 5)
            .and_then(|w| w.with_vcpus(vcpus, region + 0x100_0000, 2))
            .expect("valid");
        let finished = Workload::new(region, 64, Pattern::Random, budget, 100, 5)
            .and_then(|w| w.with_vcpus(vcpus, region + 0x100_0000, 2))
            .expect("valid");
        let ids: Vec<u64> = (0..vcpus).collect();
        let Some(out) = run_vcpus_changing_budget(
            &w,
            &w.mailbox(),
            USER_ENTRY_OFFSET,
            0,
            &ids,
            Some((after, budget)),
        ) else {
            return;
        };
        assert_eq!(out.code, EXITED, "fault at {:#x}", out.fault.0);
        let mut events = Vec::new();
        for vcpu in 0..vcpus {
            events.extend((1..=budget).map(|p| (ports::MICRO_PASS, micro::port_value(vcpu, p))));
            events.push((ports::MICRO_EXIT, micro::port_value(vcpu, EXIT_OK.into())));
        }
        assert_eq!(out.events, events, "{initial} -> {budget} after {after}");
        assert_same_image(&out.image, &zero(finished.image_after(budget)), &finished);
        assert_same_image(
            &out.shared,
            &zero(finished.shared_image_after(budget)),
            &finished,
        );
    }
}
