//! Assembles src/micro.S into a flat binary in OUT_DIR (`micro.bin`, included by lib.rs).
//!
//! GNU `as` and `objcopy` (binutils) do the work; there is no link step because the payload is
//! position independent and self-contained, which this script checks by refusing an object
//! with relocations. The ABI constants the assembly uses come from guest-abi through a
//! generated `abi.inc`, so the payload and the VMM cannot disagree about them.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use guest_abi::{gdt, layout, micro, ports};

#[allow(dead_code)] // `describe` is for the library; build.rs only needs the numbers.
#[path = "src/exit_status.rs"]
mod exit_status;

/// RFLAGS for CPL3: IOPL=3 (bits 12-13) so `out` works there, bit 1 (always set), IF=0.
const USER_RFLAGS: u64 = 0x3002;
/// Where the I/O permission bitmap starts in the TSS (shared with the VMM, which sets it up
/// for the other vCPUs).
const TSS_IOPB_OFFSET: u64 = layout::MICRO_IOPB_OFFSET;
/// Bitmap bytes the payload clears (a multiple of 8): ports 0..IOPB_BYTES*8 become usable at
/// CPL3. One 0xff byte follows, as the CPU requires.
const IOPB_BYTES: u64 = layout::MICRO_IOPB_BYTES;

// The payload shifts by the stack stride and the frame size; its frame (FR_* in micro.S) takes
// 48 bytes; the per-vCPU mailbox fields fit in the page without overlapping; the budget
// (OFF_PASSES), which the VMM may rewrite while the payload runs and which the payload reads
// after every pass, lies clear of every field the payload writes (its progress fields and
// frames).
const _: () = assert!(
    layout::MICRO_USER_STACK_STRIDE.is_power_of_two()
        && micro::VCPU_FRAME_SIZE.is_power_of_two()
        && micro::VCPU_FRAME_SIZE >= 48
        && micro::OFF_PASSES + 8 <= micro::OFF_CURRENT_PASS
        && micro::OFF_PASSES + 8 <= micro::OFF_VCPU_PASS
        && micro::OFF_VCPU_PASS + 8 * micro::MAX_VCPUS <= micro::OFF_VCPU_FRAME
        && micro::OFF_VCPU_FRAME + micro::VCPU_FRAME_SIZE * micro::MAX_VCPUS <= 4096
);

/// The 16-byte GDT descriptor of an available 64-bit TSS at `base` with byte limit `limit`.
fn tss_descriptor(base: u64, limit: u64) -> (u64, u64) {
    const AVAILABLE_TSS64_PRESENT: u64 = 0x89;
    let lo = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | AVAILABLE_TSS64_PRESENT << 40
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    (lo, base >> 32)
}

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = Path::new("src/micro.S");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed=src/exit_status.rs");
    println!("cargo:rerun-if-changed=build.rs");

    let inc = out_dir.join("abi.inc");
    fs::write(&inc, abi_include()).expect("write abi.inc");

    let obj = out_dir.join("micro.o");
    let bin = out_dir.join("micro.bin");
    run(Command::new("as")
        .arg("--64")
        .arg("-I")
        .arg(&out_dir)
        .arg("-o")
        .arg(&obj)
        .arg(src));

    let relocs = output(Command::new("objdump").arg("-r").arg(&obj));
    assert!(
        !relocs.contains("RELOCATION RECORDS"),
        "micro.S must not need relocations (it is loaded without a linker):\n{relocs}"
    );

    run(Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&obj)
        .arg(&bin));

    // A listing next to the binary, for whoever debugs a guest exit at some RIP.
    let listing = output(Command::new("objdump").arg("-d").arg(&obj));
    fs::write(out_dir.join("micro.lst"), listing).expect("write micro.lst");

    // Where CPL3 code starts, so the host can tell CPL0 from CPL3 RIPs (and test the loop).
    let symbols = output(Command::new("nm").arg(&obj));
    let user_entry = symbols
        .lines()
        .find_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [addr, _, "user_entry"] => u64::from_str_radix(addr, 16).ok(),
                _ => None,
            },
        )
        .expect("micro.o has a user_entry symbol");
    fs::write(
        out_dir.join("offsets.rs"),
        format!("/// Offset of the CPL3 entry point in `PAYLOAD`.\npub const USER_ENTRY_OFFSET: usize = {user_entry:#x};\n"),
    )
    .expect("write offsets.rs");
}

/// `.set` lines for every constant micro.S uses.
fn abi_include() -> String {
    let highest_port = u64::from(ports::MICRO_PASS.max(ports::MICRO_EXIT)) + 3;
    assert!(
        highest_port < IOPB_BYTES * 8,
        "the I/O bitmap must cover the micro guest's ports"
    );
    // The limit covers the bitmap and its 0xff end byte.
    let (desc_lo, desc_hi) = tss_descriptor(layout::TSS_GPA, TSS_IOPB_OFFSET + IOPB_BYTES);
    let consts: &[(&str, u64)] = &[
        ("GDT", layout::GDT_GPA),
        ("TSS", layout::TSS_GPA),
        ("TSS_SEL", u64::from(gdt::TSS)),
        ("TSS_IOPB_OFFSET", TSS_IOPB_OFFSET),
        ("IOPB_BYTES", IOPB_BYTES),
        ("TSS_DESC_LO", desc_lo),
        ("TSS_DESC_HI", desc_hi),
        ("MAILBOX", layout::MICRO_MAILBOX_GPA),
        ("USER_STACK_TOP", layout::MICRO_USER_STACK_TOP),
        (
            "USER_STACK_SHIFT",
            u64::from(layout::MICRO_USER_STACK_STRIDE.trailing_zeros()),
        ),
        ("MAX_VCPUS", micro::MAX_VCPUS),
        ("SEED_STRIDE", micro::SEED_STRIDE),
        ("PORT_VALUE_BITS", u64::from(micro::PORT_VALUE_BITS)),
        // The VMM identity-maps PD_COUNT GiB with 2 MiB pages.
        ("IDENTITY_MAP_END", layout::PD_COUNT << 30),
        ("IDENTITY_MAP_PAGES", (layout::PD_COUNT << 30) >> 12),
        ("USER_CS", u64::from(gdt::USER_CS)),
        ("USER_DS", u64::from(gdt::USER_DS)),
        ("USER_RFLAGS", USER_RFLAGS),
        ("PORT_PASS", u64::from(ports::MICRO_PASS)),
        ("PORT_EXIT", u64::from(ports::MICRO_EXIT)),
        ("MICRO_MAGIC", micro::MAGIC),
        ("MICRO_VERSION", micro::VERSION),
        ("OFF_MAGIC", micro::OFF_MAGIC),
        ("OFF_VERSION", micro::OFF_VERSION),
        ("OFF_REGION_GPA", micro::OFF_REGION_GPA),
        ("OFF_REGION_PAGES", micro::OFF_REGION_PAGES),
        ("OFF_PATTERN", micro::OFF_PATTERN),
        ("OFF_PASSES", micro::OFF_PASSES),
        ("OFF_PARAM", micro::OFF_PARAM),
        ("OFF_SEED", micro::OFF_SEED),
        ("OFF_CURRENT_PASS", micro::OFF_CURRENT_PASS),
        ("OFF_VCPUS", micro::OFF_VCPUS),
        ("OFF_SHARED_GPA", micro::OFF_SHARED_GPA),
        ("OFF_SHARED_PAGES", micro::OFF_SHARED_PAGES),
        ("OFF_VCPU_PASS", micro::OFF_VCPU_PASS),
        ("OFF_VCPU_FRAME", micro::OFF_VCPU_FRAME),
        (
            "VCPU_FRAME_SHIFT",
            u64::from(micro::VCPU_FRAME_SIZE.trailing_zeros()),
        ),
        ("PATTERN_SWEEP", micro::PATTERN_SWEEP),
        ("PATTERN_RANDOM", micro::PATTERN_RANDOM),
        ("PATTERN_HOTSET", micro::PATTERN_HOTSET),
        ("PATTERN_SPARSE", micro::PATTERN_SPARSE),
        ("EXIT_BAD_MAGIC", u64::from(exit_status::EXIT_BAD_MAGIC)),
        ("EXIT_BAD_VERSION", u64::from(exit_status::EXIT_BAD_VERSION)),
        ("EXIT_BAD_PATTERN", u64::from(exit_status::EXIT_BAD_PATTERN)),
        ("EXIT_BAD_REGION", u64::from(exit_status::EXIT_BAD_REGION)),
        ("EXIT_BAD_VCPU", u64::from(exit_status::EXIT_BAD_VCPU)),
    ];
    let mut s = String::from("/* Generated by build.rs from guest-abi. */\n");
    for (name, value) in consts {
        writeln!(s, ".set {name}, {value:#x}").expect("write to String");
    }
    s
}

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (GNU binutils needed): {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

fn output(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (GNU binutils needed): {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}
