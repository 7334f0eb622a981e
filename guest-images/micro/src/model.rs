//! Reference model of the payload: which page each write goes to and what it stores, computed
//! from the same `guest_abi::micro` functions the assembly implements. Exactness tests of dirty
//! tracking and migration compare guest memory and dirty sets against this.

use std::fmt;
use std::str::FromStr;

use guest_abi::{layout, micro};

/// Guest page size the workload works in.
pub const PAGE_SIZE: u64 = 4096;
/// Size of the mailbox page.
pub const MAILBOX_SIZE: usize = 4096;

/// Errors from building a workload or reading one back from a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("unknown micro guest pattern {0:?} (expected sweep, random, hotset or sparse)")]
    UnknownPattern(String),
    #[error("unknown micro guest pattern value {0} in the mailbox")]
    UnknownPatternValue(u64),
    #[error("the workload region needs at least one page")]
    NoPages,
    #[error("region GPA {0:#x} is not 4 KiB aligned")]
    Unaligned(u64),
    #[error(
        "region [{start:#x}, {end:#x}) must lie within [{min:#x}, {max:#x}) \
         (above the payload, its stack and the boot structures; below the MMIO hole)"
    )]
    OutOfRange {
        start: u64,
        end: u64,
        min: u64,
        max: u64,
    },
    #[error("pattern {0} writes `param` pages per pass: param must be at least 1")]
    NoWrites(Pattern),
    #[error("mailbox magic is {0:#x}, not {magic:#x}", magic = micro::MAGIC)]
    BadMagic(u64),
    #[error("mailbox version is {0}, not {version}", version = micro::VERSION)]
    BadVersion(u64),
    #[error("the micro guest runs on 1 to {max} vCPUs, not {0}", max = micro::MAX_VCPUS)]
    VcpuCount(u64),
    #[error("shared region GPA {0:#x} is not 4 KiB aligned")]
    SharedUnaligned(u64),
    #[error(
        "shared region [{start:#x}, {end:#x}) must lie within [{min:#x}, {max:#x}) and clear of \
         the private regions [{private_start:#x}, {private_end:#x})"
    )]
    SharedOutOfRange {
        start: u64,
        end: u64,
        min: u64,
        max: u64,
        private_start: u64,
        private_end: u64,
    },
}

/// The workload patterns (`guest_abi::micro::PATTERN_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Every page, in order.
    Sweep,
    /// `param` writes to uniformly random pages.
    Random,
    /// `param` writes, 90% of them to the first 10% of the pages.
    Hotset,
    /// Every `param`-th page.
    Sparse,
}

impl Pattern {
    pub const ALL: [Pattern; 4] = [
        Pattern::Sweep,
        Pattern::Random,
        Pattern::Hotset,
        Pattern::Sparse,
    ];

    /// The mailbox value.
    pub const fn abi(self) -> u64 {
        match self {
            Pattern::Sweep => micro::PATTERN_SWEEP,
            Pattern::Random => micro::PATTERN_RANDOM,
            Pattern::Hotset => micro::PATTERN_HOTSET,
            Pattern::Sparse => micro::PATTERN_SPARSE,
        }
    }

    pub fn from_abi(value: u64) -> Option<Pattern> {
        Pattern::ALL.into_iter().find(|p| p.abi() == value)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Pattern::Sweep => "sweep",
            Pattern::Random => "random",
            Pattern::Hotset => "hotset",
            Pattern::Sparse => "sparse",
        }
    }

    /// Whether writes draw on the PRNG.
    const fn uses_rng(self) -> bool {
        matches!(self, Pattern::Random | Pattern::Hotset)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Pattern {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pattern::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| WorkloadError::UnknownPattern(s.to_owned()))
    }
}

/// One store of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    /// The vCPU that stores it.
    pub vcpu: u64,
    /// Pass number, from 1.
    pub pass: u64,
    /// Write number within the pass, from 0.
    pub index: u64,
    /// Logical page: below `Workload::pages()` a page of the vCPU's private region, else shared
    /// page `page - pages()`.
    pub page: u64,
    /// The guest-physical address of the 8 bytes stored: offset 0 of a private page, offset
    /// `8 * vcpu` of a shared page.
    pub gpa: u64,
    /// The 8 bytes stored (`micro::store_value_for(vcpu, pass, index)`; for vCPU 0
    /// `micro::store_value(pass, index)`).
    pub value: u64,
}

/// A validated micro guest workload: what the mailbox tells the payload to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    region_gpa: u64,
    pages: u64,
    pattern: Pattern,
    passes: u64,
    param: u64,
    seed: u64,
    vcpus: u64,
    shared_gpa: u64,
    shared_pages: u64,
}

impl Workload {
    /// Lowest region start: below it lie the boot structures, the payload and its CPL3 stack.
    pub const MIN_REGION_GPA: u64 = layout::MICRO_USER_STACK_TOP;
    /// Highest region end: the end of the RAM the host keeps contiguous from 0.
    pub const MAX_REGION_END: u64 = layout::MICRO_REGION_END;

    /// A workload of `passes` passes (0 = forever) over `pages` pages at `region_gpa`. `param`
    /// is the writes per pass for random and hot set, the page stride for sparse (0 means 1),
    /// and unused for sweep. `seed` 0 is replaced by 1, as the payload does.
    pub fn new(
        region_gpa: u64,
        pages: u64,
        pattern: Pattern,
        passes: u64,
        param: u64,
        seed: u64,
    ) -> Result<Workload, WorkloadError> {
        if pages == 0 {
            return Err(WorkloadError::NoPages);
        }
        if region_gpa & (PAGE_SIZE - 1) != 0 {
            return Err(WorkloadError::Unaligned(region_gpa));
        }
        let end = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| region_gpa.checked_add(len));
        let in_range = end
            .is_some_and(|end| region_gpa >= Self::MIN_REGION_GPA && end <= Self::MAX_REGION_END);
        if !in_range {
            return Err(WorkloadError::OutOfRange {
                start: region_gpa,
                end: end.unwrap_or(u64::MAX),
                min: Self::MIN_REGION_GPA,
                max: Self::MAX_REGION_END,
            });
        }
        // A pass without writes is legal for the payload but never what a caller means, and it
        // would make `writes()` of an endless workload spin without yielding.
        if pattern.uses_rng() && param == 0 {
            return Err(WorkloadError::NoWrites(pattern));
        }
        Ok(Workload {
            region_gpa,
            pages,
            pattern,
            passes,
            param,
            seed,
            vcpus: 1,
            shared_gpa: 0,
            shared_pages: 0,
        })
    }

    /// The same workload on `vcpus` vCPUs (1..=`micro::MAX_VCPUS`), each with its own private
    /// region of `pages()` pages (vCPU i's at `region_gpa + i * pages * 4096`), plus a shared
    /// region of `shared_pages` pages at `shared_gpa` (0 pages: none) in which each vCPU writes
    /// only its own 8-byte slot. See `guest_abi::micro` for what each vCPU does.
    pub fn with_vcpus(
        self,
        vcpus: u64,
        shared_gpa: u64,
        shared_pages: u64,
    ) -> Result<Workload, WorkloadError> {
        if vcpus == 0 || vcpus > micro::MAX_VCPUS {
            return Err(WorkloadError::VcpuCount(vcpus));
        }
        let private_end = self
            .pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| len.checked_mul(vcpus))
            .and_then(|len| self.region_gpa.checked_add(len));
        let private_end = match private_end {
            Some(end) if end <= Self::MAX_REGION_END => end,
            _ => {
                return Err(WorkloadError::OutOfRange {
                    start: self.region_gpa,
                    end: private_end.unwrap_or(u64::MAX),
                    min: Self::MIN_REGION_GPA,
                    max: Self::MAX_REGION_END,
                })
            }
        };
        let shared_gpa = if shared_pages == 0 { 0 } else { shared_gpa };
        if shared_pages != 0 {
            if shared_gpa & (PAGE_SIZE - 1) != 0 {
                return Err(WorkloadError::SharedUnaligned(shared_gpa));
            }
            let end = shared_pages
                .checked_mul(PAGE_SIZE)
                .and_then(|len| shared_gpa.checked_add(len));
            let ok = end.is_some_and(|end| {
                shared_gpa >= Self::MIN_REGION_GPA
                    && end <= Self::MAX_REGION_END
                    && (end <= self.region_gpa || shared_gpa >= private_end)
            });
            if !ok {
                return Err(WorkloadError::SharedOutOfRange {
                    start: shared_gpa,
                    end: end.unwrap_or(u64::MAX),
                    min: Self::MIN_REGION_GPA,
                    max: Self::MAX_REGION_END,
                    private_start: self.region_gpa,
                    private_end,
                });
            }
        }
        Ok(Workload {
            vcpus,
            shared_gpa,
            shared_pages,
            ..self
        })
    }

    /// Reads a workload back from mailbox bytes (e.g. guest memory after a migration).
    pub fn from_mailbox(mailbox: &[u8; MAILBOX_SIZE]) -> Result<Workload, WorkloadError> {
        let field = |off: u64| read_u64(mailbox, off);
        let magic = field(micro::OFF_MAGIC);
        if magic != micro::MAGIC {
            return Err(WorkloadError::BadMagic(magic));
        }
        let version = field(micro::OFF_VERSION);
        if version != micro::VERSION {
            return Err(WorkloadError::BadVersion(version));
        }
        let pattern_value = field(micro::OFF_PATTERN);
        let pattern = Pattern::from_abi(pattern_value)
            .ok_or(WorkloadError::UnknownPatternValue(pattern_value))?;
        Workload::new(
            field(micro::OFF_REGION_GPA),
            field(micro::OFF_REGION_PAGES),
            pattern,
            field(micro::OFF_PASSES),
            field(micro::OFF_PARAM),
            field(micro::OFF_SEED),
        )?
        .with_vcpus(
            // The payload reads a count of 0 as 1.
            field(micro::OFF_VCPUS).max(1),
            field(micro::OFF_SHARED_GPA),
            field(micro::OFF_SHARED_PAGES),
        )
    }

    /// Fills the mailbox page: every field, the current pass 0, the rest zero. The VMM copies it
    /// to `layout::MICRO_MAILBOX_GPA` before the first KVM_RUN.
    pub fn write_mailbox(&self, mailbox: &mut [u8; MAILBOX_SIZE]) {
        mailbox.fill(0);
        let fields = [
            (micro::OFF_MAGIC, micro::MAGIC),
            (micro::OFF_VERSION, micro::VERSION),
            (micro::OFF_REGION_GPA, self.region_gpa),
            (micro::OFF_REGION_PAGES, self.pages),
            (micro::OFF_PATTERN, self.pattern.abi()),
            (micro::OFF_PASSES, self.passes),
            (micro::OFF_PARAM, self.param),
            (micro::OFF_SEED, self.seed),
            (micro::OFF_CURRENT_PASS, 0),
            (micro::OFF_VCPUS, self.vcpus),
            (micro::OFF_SHARED_GPA, self.shared_gpa),
            (micro::OFF_SHARED_PAGES, self.shared_pages),
        ];
        for (off, value) in fields {
            write_u64(mailbox, off, value);
        }
    }

    /// The mailbox bytes, as a new page.
    pub fn mailbox(&self) -> [u8; MAILBOX_SIZE] {
        let mut page = [0; MAILBOX_SIZE];
        self.write_mailbox(&mut page);
        page
    }

    pub fn region_gpa(&self) -> u64 {
        self.region_gpa
    }
    pub fn pages(&self) -> u64 {
        self.pages
    }
    pub fn pattern(&self) -> Pattern {
        self.pattern
    }
    /// Number of passes; 0 = forever.
    pub fn passes(&self) -> u64 {
        self.passes
    }
    pub fn param(&self) -> u64 {
        self.param
    }
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// Number of vCPUs running the workload (1 unless set by `with_vcpus`).
    pub fn vcpus(&self) -> u64 {
        self.vcpus
    }
    /// Start of the shared region (0 when there is none).
    pub fn shared_gpa(&self) -> u64 {
        self.shared_gpa
    }
    /// Pages of the shared region (0: none).
    pub fn shared_pages(&self) -> u64 {
        self.shared_pages
    }
    /// Pages each vCPU's pattern ranges over: its private pages, then the shared ones.
    pub fn logical_pages(&self) -> u64 {
        self.pages + self.shared_pages
    }

    /// First GPA past vCPU 0's region (with one vCPU: past the region).
    pub fn region_end(&self) -> u64 {
        // Cannot overflow: checked in `new`.
        self.region_gpa + self.pages * PAGE_SIZE
    }

    /// First GPA past the private regions of all vCPUs (they are contiguous).
    pub fn private_regions_end(&self) -> u64 {
        // Cannot overflow: checked in `with_vcpus`.
        self.region_gpa + self.vcpus * self.pages * PAGE_SIZE
    }

    /// Start of vCPU `vcpu`'s private region.
    pub fn private_region_gpa(&self, vcpu: u64) -> u64 {
        self.region_gpa + vcpu * self.pages * PAGE_SIZE
    }

    /// GPA of page `page` of vCPU 0's region.
    pub fn page_gpa(&self, page: u64) -> u64 {
        self.region_gpa + page * PAGE_SIZE
    }

    /// Writes in each pass (of each vCPU).
    pub fn writes_per_pass(&self) -> u64 {
        micro::writes_per_pass(self.pattern.abi(), self.logical_pages(), self.param)
    }

    /// Every write of vCPU 0 in order, from pass 1. Endless when `passes` is 0 (use
    /// `take_while` on `Write::pass`).
    pub fn writes(&self) -> Writes {
        self.writes_from_pass(1)
    }

    /// vCPU 0's writes from the start of pass `pass` (from 1) on. Skipping earlier passes only
    /// steps the PRNG, which carries over from pass to pass.
    pub fn writes_from_pass(&self, pass: u64) -> Writes {
        self.vcpu_writes_from_pass(0, pass)
    }

    /// Every write of vCPU `vcpu` in order, from pass 1.
    pub fn vcpu_writes(&self, vcpu: u64) -> Writes {
        self.vcpu_writes_from_pass(vcpu, 1)
    }

    /// vCPU `vcpu`'s writes from the start of pass `pass` (from 1) on.
    pub fn vcpu_writes_from_pass(&self, vcpu: u64, pass: u64) -> Writes {
        let pass = pass.max(1);
        let per_pass = self.writes_per_pass();
        let mut rng = guest_abi::pattern::pattern_state(micro::vcpu_seed(self.seed, vcpu));
        if self.pattern.uses_rng() {
            for _ in 0..(pass - 1).saturating_mul(per_pass) {
                rng = micro::xorshift64(rng);
            }
        }
        Writes {
            workload: *self,
            vcpu,
            per_pass,
            pass,
            index: 0,
            rng,
            pattern_abi: self.pattern.abi(),
            uses_rng: self.pattern.uses_rng(),
            logical_pages: self.logical_pages(),
            private_base: self.private_region_gpa(vcpu),
            shared_slot: self.shared_gpa + 8 * vcpu,
            value_tag: micro::store_value_for(vcpu, 0, 0),
        }
    }

    /// The pages written during pass `pass` (from 1): exactly what a dirty log harvested right
    /// before and right after that pass must hold for the region. See
    /// `pages_written_in_passes` for several vCPUs.
    pub fn pages_written_in_pass(&self, pass: u64) -> PageBitmap {
        self.pages_written_in_passes(pass, pass)
    }

    /// The private pages written during passes `first..=last`, over all private regions (bit
    /// `vcpu * pages + page`; with one vCPU, the region's pages). Writes to the shared region
    /// are not in it. With several vCPUs the passes are each vCPU's own.
    pub fn pages_written_in_passes(&self, first: u64, last: u64) -> PageBitmap {
        let mut set = PageBitmap::new(self.vcpus * self.pages);
        for vcpu in 0..self.vcpus {
            let writes = self.vcpu_writes_from_pass(vcpu, first);
            for w in writes.take_while(|w| w.pass <= last) {
                if w.page < self.pages {
                    set.insert(vcpu * self.pages + w.page);
                }
            }
        }
        set
    }

    /// The last value stored in each private page after `passes` complete passes of every vCPU
    /// (`None`: never written, so still what the VMM put there), vCPU 0's region first: entry
    /// `vcpu * pages + page`, for the contiguous private regions from `region_gpa`. Only the
    /// first 8 bytes of a private page are written.
    pub fn image_after(&self, passes: u64) -> Vec<Option<u64>> {
        let mut image = vec![None; to_usize(self.vcpus * self.pages)];
        for vcpu in 0..self.vcpus {
            let base = vcpu * self.pages;
            self.for_each_store(vcpu, passes, |page, value| {
                if page < self.pages {
                    image[to_usize(base + page)] = Some(value);
                }
            });
        }
        image
    }

    /// The shared region after `passes` complete passes of every vCPU, word by word: entry
    /// `page * 512 + word` is the u64 at `shared_gpa + page * 4096 + 8 * word`. Word `i <
    /// vcpus` is vCPU i's slot (`None`: never written); every other word is never written
    /// (`None`). Empty without a shared region.
    pub fn shared_image_after(&self, passes: u64) -> Vec<Option<u64>> {
        const WORDS: u64 = PAGE_SIZE / 8;
        let mut image = vec![None; to_usize(self.shared_pages * WORDS)];
        if self.shared_pages == 0 {
            return image;
        }
        for vcpu in 0..self.vcpus {
            self.for_each_store(vcpu, passes, |page, value| {
                if page >= self.pages {
                    image[to_usize((page - self.pages) * WORDS + vcpu)] = Some(value);
                }
            });
        }
        image
    }

    /// Calls `f(logical page, value)` for each write of vCPU `vcpu` in passes `1..=passes`:
    /// what `vcpu_writes` yields, without building a `Write` each time. The final images of a
    /// long workload take tens of millions of writes (in debug builds too: a migration
    /// destination computes one), so this is the model's hot loop.
    fn for_each_store(&self, vcpu: u64, passes: u64, mut f: impl FnMut(u64, u64)) {
        let per_pass = self.writes_per_pass();
        let pattern = self.pattern.abi();
        let uses_rng = self.pattern.uses_rng();
        let pages = self.logical_pages();
        let mut rng = guest_abi::pattern::pattern_state(micro::vcpu_seed(self.seed, vcpu));
        for pass in 1..=passes {
            // store_value_for(vcpu, pass, i) = this | (u32)i.
            let high = micro::store_value_for(vcpu, pass, 0);
            for i in 0..per_pass {
                if uses_rng {
                    rng = micro::xorshift64(rng);
                }
                f(
                    micro::page_for(pattern, pages, self.param, i, rng),
                    high | (i & 0xffff_ffff),
                );
            }
        }
    }

    /// The image once the workload has finished; `None` for an endless workload.
    pub fn final_image(&self) -> Option<Vec<Option<u64>>> {
        (self.passes != 0).then(|| self.image_after(self.passes))
    }
}

/// Iterator over a workload's writes; see `Workload::writes`.
#[derive(Debug, Clone)]
pub struct Writes {
    workload: Workload,
    vcpu: u64,
    per_pass: u64,
    pass: u64,
    index: u64,
    rng: u64,
    // Per-workload constants, computed once (the model runs tens of millions of writes for a
    // long workload, in debug builds too).
    pattern_abi: u64,
    uses_rng: bool,
    logical_pages: u64,
    /// This vCPU's private region.
    private_base: u64,
    /// This vCPU's slot in shared page 0.
    shared_slot: u64,
    /// `vcpu << 56`, xor-ed into `store_value` (`micro::store_value_for`).
    value_tag: u64,
}

impl Iterator for Writes {
    type Item = Write;

    fn next(&mut self) -> Option<Write> {
        let w = &self.workload;
        if self.index == self.per_pass {
            self.pass += 1;
            self.index = 0;
        }
        if w.passes != 0 && self.pass > w.passes {
            return None;
        }
        if self.uses_rng {
            self.rng = micro::xorshift64(self.rng);
        }
        let page = micro::page_for(
            self.pattern_abi,
            self.logical_pages,
            w.param,
            self.index,
            self.rng,
        );
        let gpa = if page < w.pages {
            self.private_base + page * PAGE_SIZE
        } else {
            self.shared_slot + (page - w.pages) * PAGE_SIZE
        };
        let write = Write {
            vcpu: self.vcpu,
            pass: self.pass,
            index: self.index,
            page,
            gpa,
            // micro::store_value_for(vcpu, pass, index), with the vCPU part precomputed.
            value: micro::store_value(self.pass, self.index) ^ self.value_tag,
        };
        self.index += 1;
        Some(write)
    }
}

/// A set of region pages as a bitmap of little-endian u64 words, bit `i % 64` of word `i / 64`
/// for page `i`: the layout of KVM's dirty log, so the two compare directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBitmap {
    pages: u64,
    words: Vec<u64>,
}

impl PageBitmap {
    /// An empty set over `pages` pages.
    pub fn new(pages: u64) -> PageBitmap {
        PageBitmap {
            pages,
            words: vec![0; to_usize(pages.div_ceil(64))],
        }
    }

    /// A set from bitmap words (e.g. a dirty log). Bits at or beyond `pages` are ignored, so
    /// a log covering a larger slot can be cut to the region first.
    pub fn from_words(pages: u64, words: &[u64]) -> PageBitmap {
        let mut set = PageBitmap::new(pages);
        for (dst, src) in set.words.iter_mut().zip(words) {
            *dst = *src;
        }
        let tail = pages % 64;
        if tail != 0 {
            if let Some(last) = set.words.last_mut() {
                *last &= (1 << tail) - 1;
            }
        }
        set
    }

    /// Number of pages the set ranges over.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Adds `page`; panics if it is outside the set's range (a model bug).
    pub fn insert(&mut self, page: u64) {
        assert!(
            page < self.pages,
            "page {page} outside {} pages",
            self.pages
        );
        self.words[to_usize(page / 64)] |= 1 << (page % 64);
    }

    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[to_usize(page / 64)] & (1 << (page % 64)) != 0
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The pages in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &word)| {
            (0..64u64)
                .filter(move |bit| word & (1 << bit) != 0)
                .map(move |bit| i as u64 * 64 + bit)
        })
    }

    /// Adds every page of `other` (which must range over the same pages).
    pub fn union_with(&mut self, other: &PageBitmap) {
        assert_eq!(self.pages, other.pages, "bitmaps over different ranges");
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }
}

/// A page count or index as a `usize`, for indexing host-side vectors. Region sizes are bounded
/// by `Workload::MAX_REGION_END`, far below `usize::MAX` on the 64-bit hosts vmm runs on.
fn to_usize(pages: u64) -> usize {
    usize::try_from(pages).expect("page count fits in usize on a 64-bit host")
}

fn read_u64(page: &[u8; MAILBOX_SIZE], off: u64) -> u64 {
    let off = off as usize;
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&page[off..off + 8]);
    u64::from_le_bytes(bytes)
}

fn write_u64(page: &mut [u8; MAILBOX_SIZE], off: u64, value: u64) {
    let off = off as usize;
    page[off..off + 8].copy_from_slice(&value.to_le_bytes());
}

/// The pass the payload was running when the mailbox was read (0: not started yet). With
/// several vCPUs: vCPU 0's.
pub fn current_pass(mailbox: &[u8; MAILBOX_SIZE]) -> u64 {
    read_u64(mailbox, micro::OFF_CURRENT_PASS)
}

/// The pass vCPU `vcpu` was running when the mailbox was read (0: not started yet, or `vcpu`
/// is not below `micro::MAX_VCPUS`).
pub fn vcpu_current_pass(mailbox: &[u8; MAILBOX_SIZE], vcpu: u64) -> u64 {
    if vcpu >= micro::MAX_VCPUS {
        return 0;
    }
    read_u64(mailbox, micro::vcpu_pass_offset(vcpu))
}
