//! The driver's side of a split virtqueue, laid out by hand in test guest memory.
//!
//! Hand-written rather than virtio-queue's `MockSplitQueue` (feature `test-utils`): tests need
//! to place exact, sometimes malformed, chains and read back used_event / avail_event, and this
//! is shorter than bending the mock to it.

use vm_memory::{Bytes, GuestAddress};

use super::mmio::MmioTransport;
use crate::bus::BusDevice;
use crate::GuestMemory;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;

/// A buffer of a chain: guest address, length, device-writable or not.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Buf {
    pub fn ro(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }
    pub fn wo(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// Guest memory `[0, size)`.
pub fn guest_memory(size: usize) -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// A split queue of `size` entries: descriptor table at `base`, avail ring after it, used ring
/// on the next 4 KiB page.
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl DriverQueue {
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 0xfff) & !0xfff;
        let q = Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        };
        // Zeroed rings: flags, idx and events all 0.
        let end = used + 6 + 8 * u64::from(size);
        mem.write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base))
            .unwrap();
        q
    }

    /// Writes one descriptor at table index `i`.
    pub fn write_desc(
        &self,
        mem: &GuestMemory,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc + 16 * u64::from(i);
        mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
    }

    /// Lays `bufs` out as one chain and makes it available; returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (k, b) in bufs.iter().enumerate() {
            let i = (head + k as u16) % self.size;
            let last = k + 1 == bufs.len();
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(mem, i, b.addr, b.len, flags, (i + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    /// Puts `head` in the avail ring and bumps avail.idx.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Overwrites avail.idx (tests of a corrupt ring use it directly).
    pub fn set_avail_idx(&self, mem: &GuestMemory, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// avail ring's used_event (EVENT_IDX): interrupt me once used.idx passes this.
    pub fn set_used_event(&self, mem: &GuestMemory, event: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(event.to_le(), GuestAddress(at)).unwrap();
    }

    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// Used ring element `n`: (descriptor head, length).
    pub fn used_elem(&self, mem: &GuestMemory, n: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(n % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// used ring's avail_event (EVENT_IDX): where the device wants the next notification.
    pub fn avail_event(&self, mem: &GuestMemory) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        u16::from_le(mem.read_obj(GuestAddress(at)).unwrap())
    }
}

/// Reads a 32-bit register of a transport.
pub fn reg_read(t: &mut MmioTransport, offset: u32) -> u32 {
    let mut data = [0u8; 4];
    t.read(u64::from(offset), &mut data);
    u32::from_le_bytes(data)
}

/// Writes a 32-bit register of a transport.
pub fn reg_write(t: &mut MmioTransport, offset: u32, value: u32) {
    t.write(u64::from(offset), &value.to_le_bytes());
}
