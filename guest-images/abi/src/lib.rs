//! The contract between vmm and the guests it runs: what a guest itself must know (boot
//! structures, the ports and addresses built into its drivers and agent, the micro guest's
//! mailbox). Where the host places everything else (the MMIO hole, device slots, interrupts) is
//! the host's business: `vmm::vstate::resources`. Guests (the agent, the micro guest) and the host
//! both read these constants, so a change here changes both sides at once.
//!
//! `no_std` so that anything, including guest-side code, can depend on it.
#![no_std]

/// Guest-physical memory layout used for every guest.
pub mod layout {
    /// Boot GDT (see `gdt` below for its selectors).
    pub const GDT_GPA: u64 = 0x500;
    /// Empty boot IDT (limit 0: any exception before the guest installs its own is a triple fault).
    pub const IDT_GPA: u64 = GDT_GPA + 8 * super::gdt::ENTRIES as u64;
    /// A 64-bit TSS so TR holds something valid; the micro guest never changes privilege through it.
    /// The micro guest adds an I/O permission bitmap (it writes `[TSS_GPA + 0x66, + 0x111)`),
    /// rewrites the TSS descriptor with the larger limit and reloads TR, so CPL3 can use its ports.
    /// With several vCPUs vmm writes the same bitmap before any vCPU runs and loads the other
    /// vCPUs' TR with the covering limit itself (see `micro`).
    pub const TSS_GPA: u64 = 0x1000;
    /// The micro guest's mailbox page (see `micro`).
    pub const MICRO_MAILBOX_GPA: u64 = 0x6000;
    /// Linux zero page (`struct boot_params`).
    pub const ZERO_PAGE_GPA: u64 = 0x7000;
    /// Initial kernel stack pointer for the boot vCPU.
    pub const BOOT_STACK_GPA: u64 = 0x8ff0;
    /// PML4; followed by one PDPT and `PD_COUNT` page directories (identity map, 2 MiB pages).
    pub const PML4_GPA: u64 = 0x9000;
    pub const PDPT_GPA: u64 = 0xa000;
    pub const PD_GPA: u64 = 0xb000;
    /// Page directories: 4 of them identity-map the first 4 GiB.
    pub const PD_COUNT: u64 = 4;
    /// Kernel command line.
    pub const CMDLINE_GPA: u64 = 0x2_0000;
    pub const CMDLINE_MAX: usize = 4096;
    /// The MP table lives in the last KiB of base memory, where the kernel's scan looks (EBDA).
    pub const MPTABLE_GPA: u64 = 0x9_fc00;
    /// End of conventional memory below the legacy hole.
    pub const EBDA_END: u64 = 0xa_0000;
    /// Legacy hole: [0xA0000, 0x100000) is not RAM in the e820 map.
    pub const HIMEM_START: u64 = 0x10_0000;
    /// Where the micro guest payload is loaded and entered (CPL0, long mode).
    pub const MICRO_LOAD_GPA: u64 = 0x10_0000;
    /// Largest micro payload accepted.
    pub const MICRO_MAX_SIZE: u64 = 0x10_0000;
    /// Top of the micro guest's CPL3 stack (vCPU 0; vCPU i's is `MICRO_USER_STACK_STRIDE * i`
    /// lower).
    pub const MICRO_USER_STACK_TOP: u64 = 0x30_0000;
    /// Distance between the CPL3 stacks of consecutive micro guest vCPUs.
    pub const MICRO_USER_STACK_STRIDE: u64 = 0x1000;
    /// Distance between the CPL0 entry stacks of consecutive micro guest vCPUs: vCPU i enters
    /// with RSP = `BOOT_STACK_GPA - i * MICRO_BOOT_STACK_STRIDE` (the payload pushes one iretq
    /// frame, 40 bytes).
    pub const MICRO_BOOT_STACK_STRIDE: u64 = 0x100;
    /// Where the micro guest's I/O permission bitmap starts in the TSS: right after the
    /// 104-byte 64-bit TSS (the TSS's I/O map base field, at offset 102, holds this).
    pub const MICRO_IOPB_OFFSET: u64 = 104;
    /// Bitmap bytes (all zero: ports 0..MICRO_IOPB_BYTES*8 usable at CPL3), followed by one
    /// 0xff byte, as the CPU requires. The TR limit that covers them is
    /// `MICRO_IOPB_OFFSET + MICRO_IOPB_BYTES`.
    pub const MICRO_IOPB_BYTES: u64 = 168;
    /// Default start of the micro guest's workload region (above its code and stack).
    pub const MICRO_REGION_GPA: u64 = 0x40_0000;
    /// The micro guest's workload region ends at or below this: the host keeps guest RAM
    /// contiguous from 0 up to here (its 32-bit MMIO hole starts no lower), and the payload's
    /// identity map covers it. The Linux guest learns its RAM from the e820 map instead.
    pub const MICRO_REGION_END: u64 = 0xc000_0000;
}

/// Boot GDT selectors. Linux's 64-bit boot protocol wants code at 0x10 and data at 0x18.
pub mod gdt {
    pub const KERNEL_CS: u16 = 0x10;
    pub const KERNEL_DS: u16 = 0x18;
    /// 64-bit TSS descriptor (two GDT slots).
    pub const TSS: u16 = 0x20;
    /// CPL3 data and 64-bit code selectors, RPL 3 included.
    pub const USER_DS: u16 = 0x33;
    pub const USER_CS: u16 = 0x3b;
    /// Number of 8-byte GDT slots.
    pub const ENTRIES: usize = 8;
}

/// The boot-timer pseudo device: the guest writes `MAGIC` to `GPA`; vmm logs the time since its
/// own start. Same idea as Firecracker's boot timer. The guest agent has the address built in,
/// so the host reserves this page in its MMIO hole.
pub mod boot_timer {
    pub const GPA: u64 = 0xd000_0000;
    pub const SIZE: u64 = 0x1000;
    pub const MAGIC: u8 = 123;
}

/// Legacy port-I/O devices.
pub mod ports {
    /// COM1 16550 UART, on ISA IRQ 4: Linux's 8250 driver has both built in (no probing, no
    /// table from the host), so the host must wire exactly these.
    pub const COM1: u16 = 0x3f8;
    pub const COM1_LEN: u16 = 8;
    pub const COM1_IRQ: u32 = 4;
    /// i8042 controller: command/status port. A write of 0xfe here is a CPU reset request.
    pub const I8042_DATA: u16 = 0x60;
    pub const I8042_CMD: u16 = 0x64;
    pub const I8042_RESET_CMD: u8 = 0xfe;
    /// Micro guest: `out` of a 32-bit pass number (starting at 1) when a pass completes.
    pub const MICRO_PASS: u16 = 0x510;
    /// Micro guest: `out` of a 32-bit status when the workload is finished (0 = success).
    pub const MICRO_EXIT: u16 = 0x514;
    /// Width of the micro guest's port window (both ports above).
    pub const MICRO_LEN: u16 = 8;
}

/// The micro guest's mailbox: a page of little-endian u64 fields at `layout::MICRO_MAILBOX_GPA`,
/// written by vmm before the first KVM_RUN and read by the payload. Only `OFF_PASSES` may change
/// afterwards (the payload reads it after every pass); the other inputs are read once.
///
/// # Several vCPUs
/// Every vCPU runs the workload. vCPU 0 (the BSP) enters as with one vCPU; the VMM starts each
/// other vCPU i (no INIT/SIPI) at the same entry point, CPL0, with RSI = i, RSP =
/// `BOOT_STACK_GPA - i * MICRO_BOOT_STACK_STRIDE`, TR already loaded with the TSS and a limit
/// that covers the I/O bitmap, which the VMM writes into the TSS before any vCPU runs (vCPU 0
/// writes the same bytes again at CPL0; nothing else is shared set-up). vCPU i then:
/// - writes its private region: `OFF_REGION_PAGES` pages at
///   `region_gpa + i * region_pages * 4096` (the private regions are contiguous);
/// - runs the pattern over `region_pages + shared_pages` logical pages: logical page `p <
///   region_pages` is its private page `p` (store at offset 0), logical page `region_pages + s`
///   is shared page `s`, where it stores at offset `8 * i` only (its own slot), so the final
///   memory does not depend on how the vCPUs interleave;
/// - uses PRNG seed `vcpu_seed(seed, i)` and stores `store_value_for(i, pass, write)`;
/// - stores its pass at `vcpu_pass_offset(i)` before each pass (vCPU 0 also at
///   `OFF_CURRENT_PASS`), writes `port_value(i, pass)` to `ports::MICRO_PASS` after each pass,
///   then reads the budget at `OFF_PASSES`, and writes `port_value(i, status)` to
///   `ports::MICRO_EXIT` when done. The VM is finished once every
///   vCPU has exited with status 0 (any other status ends it at once).
///
/// With one vCPU and no shared region all of this is what version 1 did.
pub mod micro {
    /// `b"MICROGST"` as a little-endian u64.
    pub const MAGIC: u64 = u64::from_le_bytes(*b"MICROGST");
    /// 2: vCPU count, shared region and per-vCPU progress fields.
    pub const VERSION: u64 = 2;
    /// Most vCPUs the micro guest runs on (per-vCPU mailbox slots, stacks, shared-page slots).
    pub const MAX_VCPUS: u64 = 8;

    /// Byte offsets of the mailbox fields.
    pub const OFF_MAGIC: u64 = 0;
    pub const OFF_VERSION: u64 = 8;
    /// Guest-physical start of the workload region (page aligned, identity mapped).
    pub const OFF_REGION_GPA: u64 = 16;
    /// Size of the region in 4 KiB pages (at least 1).
    pub const OFF_REGION_PAGES: u64 = 24;
    /// One of the `PATTERN_*` values.
    pub const OFF_PATTERN: u64 = 32;
    /// Number of passes, the budget (0 = run forever). Read by every vCPU after every pass (right
    /// after its `ports::MICRO_PASS` write), never kept: the VMM may set or change it while the
    /// guest runs. A vCPU that has completed pass `p` goes on while the budget is 0 or above
    /// `p`, and exits otherwise. To end an endless run after exactly `T` passes, the VMM pauses
    /// every vCPU, picks `T` above every vCPU's `vcpu_pass_offset` field, writes it here and
    /// resumes: each vCPU then runs passes up to `T` and exits, so the final memory depends only
    /// on the workload and the final budget (`vmm remote ... finish --after N`).
    pub const OFF_PASSES: u64 = 40;
    /// Writes per pass for `random` and `hotset`; page stride for `sparse`; unused for `sweep`.
    pub const OFF_PARAM: u64 = 48;
    /// PRNG seed (xorshift64; 0 is replaced by 1). The state is advanced once (`x =
    /// xorshift64(x)`) before each write of the random and hot-set patterns and carries over
    /// from one pass to the next: it is never reset between passes.
    pub const OFF_SEED: u64 = 56;
    /// The guest stores the number of the pass it is running here (progress, for the host).
    /// With several vCPUs: vCPU 0's pass.
    pub const OFF_CURRENT_PASS: u64 = 64;
    /// Number of vCPUs that run the workload, 1..=`MAX_VCPUS` (0 is read as 1). A vCPU whose
    /// index is not below it exits with `EXIT_BAD_VCPU`.
    pub const OFF_VCPUS: u64 = 72;
    /// Guest-physical start of the shared region (page aligned; ignored without shared pages).
    pub const OFF_SHARED_GPA: u64 = 80;
    /// Size of the shared region in 4 KiB pages (0: none).
    pub const OFF_SHARED_PAGES: u64 = 88;
    /// Per-vCPU progress: vCPU i stores the pass it is running at `OFF_VCPU_PASS + 8 * i`.
    pub const OFF_VCPU_PASS: u64 = 128;
    /// The payload's own per-vCPU scratch: vCPU i keeps its constants in the `VCPU_FRAME_SIZE`
    /// bytes at `OFF_VCPU_FRAME + VCPU_FRAME_SIZE * i` (so that it writes no stack page). vmm
    /// writes zeros there and reads nothing back.
    pub const OFF_VCPU_FRAME: u64 = 256;
    pub const VCPU_FRAME_SIZE: u64 = 64;

    /// Mailbox offset of vCPU `vcpu`'s current pass.
    pub const fn vcpu_pass_offset(vcpu: u64) -> u64 {
        OFF_VCPU_PASS + 8 * vcpu
    }

    /// Added (times the vCPU index) to the seed: odd, so every vCPU gets a different seed.
    pub const SEED_STRIDE: u64 = 0x9e37_79b9_7f4a_7c15;

    /// The seed vCPU `vcpu` uses (then 0 is replaced by 1, as for one vCPU): `seed + vcpu *
    /// SEED_STRIDE`, wrapping. vCPU 0 uses `seed` itself.
    pub const fn vcpu_seed(seed: u64, vcpu: u64) -> u64 {
        seed.wrapping_add(vcpu.wrapping_mul(SEED_STRIDE))
    }

    /// Bits of a port value that carry the pass number or exit status; the vCPU index is above.
    pub const PORT_VALUE_BITS: u32 = 24;

    /// The 32-bit value vCPU `vcpu` writes to `ports::MICRO_PASS` (pass number, modulo 2^24) or
    /// `ports::MICRO_EXIT` (status): `vcpu << 24 | (value & 0xff_ffff)`. For vCPU 0 and fewer
    /// than 2^24 passes this is the plain number.
    pub const fn port_value(vcpu: u64, value: u64) -> u32 {
        (((vcpu & 0xff) << PORT_VALUE_BITS) | (value & ((1 << PORT_VALUE_BITS) - 1))) as u32
    }

    /// Splits a port value into (vCPU index, pass modulo 2^24 or status).
    pub const fn split_port_value(value: u32) -> (u64, u64) {
        (
            (value >> PORT_VALUE_BITS) as u64,
            (value & ((1 << PORT_VALUE_BITS) - 1)) as u64,
        )
    }

    /// Every page of the region, in order.
    pub const PATTERN_SWEEP: u64 = 0;
    /// `param` writes to uniformly random pages.
    pub const PATTERN_RANDOM: u64 = 1;
    /// `param` writes: 90% to the first 10% of pages (at least one page), 10% uniform.
    pub const PATTERN_HOTSET: u64 = 2;
    /// Every `param`-th page (param 0 is treated as 1).
    pub const PATTERN_SPARSE: u64 = 3;

    /// The value the payload stores (8 bytes at offset 0 of the page) for write number `i`
    /// (counting from 0 within the pass) of pass `pass` (counting from 1).
    pub const fn store_value(pass: u64, i: u64) -> u64 {
        (pass << 32) | (i & 0xffff_ffff)
    }

    /// What vCPU `vcpu` stores for write `i` of pass `pass`: `store_value(pass, i) ^ vcpu << 56`
    /// (vCPU 0 stores `store_value` itself), so no two vCPUs store the same value.
    pub const fn store_value_for(vcpu: u64, pass: u64, i: u64) -> u64 {
        store_value(pass, i) ^ (vcpu << 56)
    }

    /// xorshift64, the payload's PRNG. One step.
    pub const fn xorshift64(mut x: u64) -> u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }

    /// Page index (within the region) of write `i`, given the PRNG state after advancing for it.
    /// Random: `rng % pages`. Hot set: if `rng % 10 != 0` -> `(rng / 16) % hot`, else
    /// `(rng / 16) % pages`, where `hot = max(1, pages / 10)`.
    // `u64::is_multiple_of` (clippy's suggestion) needs Rust 1.87; the workspace MSRV is 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    pub const fn page_for(pattern: u64, pages: u64, param: u64, i: u64, rng: u64) -> u64 {
        match pattern {
            PATTERN_SWEEP => i,
            PATTERN_RANDOM => rng % pages,
            PATTERN_HOTSET => {
                let hot = if pages / 10 == 0 { 1 } else { pages / 10 };
                if rng % 10 != 0 {
                    (rng / 16) % hot
                } else {
                    (rng / 16) % pages
                }
            }
            _ => {
                let stride = if param == 0 { 1 } else { param };
                i * stride
            }
        }
    }

    /// Number of writes in one pass.
    pub const fn writes_per_pass(pattern: u64, pages: u64, param: u64) -> u64 {
        match pattern {
            PATTERN_SWEEP => pages,
            PATTERN_RANDOM | PATTERN_HOTSET => param,
            _ => {
                let stride = if param == 0 { 1 } else { param };
                pages.div_ceil(stride)
            }
        }
    }
}

/// How the host talks to the guest agent.
pub mod agent {
    /// Printed on the console once the agent is up (after the boot-timer write).
    pub const READY_MARKER: &str = "VMM-AGENT-READY";
    /// Kernel command-line key carrying the agent's script: `vmm.agent=cmd1;cmd2;...`
    /// (no spaces; `,` separates a command's arguments).
    pub const CMDLINE_KEY: &str = "vmm.agent=";
    /// Prefix of every line the agent prints as a result, so a host can grep them.
    pub const RESULT_PREFIX: &str = "AGENT:";
}

/// Deterministic data and checksums that guest-side tools (the agent's `blkwrite`, `blkread`)
/// produce and the host reproduces to check them. No allocation, so it stays `no_std`.
pub mod pattern {
    use super::micro::xorshift64;

    /// FNV-1a 64-bit offset basis: the hash of zero bytes.
    pub const FNV1A64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    /// FNV-1a 64-bit prime.
    pub const FNV1A64_PRIME: u64 = 0x0000_0100_0000_01b3;

    /// Continues an FNV-1a 64 hash over `bytes`, so data can be hashed in chunks:
    /// `fnv1a64_update(fnv1a64(a), b) == fnv1a64(a ++ b)`.
    pub const fn fnv1a64_update(mut hash: u64, bytes: &[u8]) -> u64 {
        let mut i = 0;
        while i < bytes.len() {
            hash ^= bytes[i] as u64;
            hash = hash.wrapping_mul(FNV1A64_PRIME);
            i += 1;
        }
        hash
    }

    /// FNV-1a 64 of `bytes`.
    pub const fn fnv1a64(bytes: &[u8]) -> u64 {
        fnv1a64_update(FNV1A64_OFFSET, bytes)
    }

    /// The PRNG state a pattern starts from: the seed, with 0 replaced by 1 (xorshift64 would
    /// stay at 0 forever).
    pub const fn pattern_state(seed: u64) -> u64 {
        if seed == 0 {
            1
        } else {
            seed
        }
    }

    /// Fills `buf` with the pattern for `seed`: the little-endian bytes of successive xorshift64
    /// states, each state advanced *before* it is used, the last one truncated to fit.
    pub fn fill_pattern(seed: u64, buf: &mut [u8]) {
        fill_pattern_continue(pattern_state(seed), buf);
    }

    /// Like `fill_pattern`, but starting from PRNG state `state` (not a seed: 0 stays 0) and
    /// returning the state after the last word used, so a long pattern can be produced in
    /// chunks. Chunking matches `fill_pattern` over the whole length as long as every chunk but
    /// the last has a length that is a multiple of 8.
    pub fn fill_pattern_continue(mut state: u64, buf: &mut [u8]) -> u64 {
        for chunk in buf.chunks_mut(8) {
            state = xorshift64(state);
            let bytes = state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        state
    }
}
