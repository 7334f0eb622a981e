//! VFIO's capability chains (`struct vfio_info_cap_header`: id u16, version u16, next u32; each
//! `next` an offset from the start of the info struct, 0 ending the chain), walked over the bytes
//! the kernel returned, with every offset bounds-checked: no pointer into the buffer is formed.

/// `sizeof(struct vfio_info_cap_header)`.
pub const HEADER: usize = 8;
/// A chain longer than this is taken to be corrupt (a loop).
const MAX_CAPS: usize = 64;

/// One capability: its id, version, and its bytes from its header up to the end of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap<'a> {
    pub id: u16,
    pub version: u16,
    pub bytes: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapError {
    #[error("capability offset {offset} lies outside the {len} bytes returned")]
    OutOfBounds { offset: usize, len: usize },
    #[error("capability chain longer than {MAX_CAPS} entries (a loop?)")]
    TooLong,
    #[error("capability {id} is {have} bytes, needs {need}")]
    Short { id: u16, have: usize, need: usize },
}

pub fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

pub fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

pub fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// The chain starting at `first`, in `tail`: the bytes that follow a fixed info struct of
/// `base` bytes (offsets count from the struct's start, so offset `base` is `tail[0]`).
pub fn walk(tail: &[u8], base: usize, first: u32) -> Result<Vec<Cap<'_>>, CapError> {
    let mut caps = Vec::new();
    let mut next = first as usize;
    while next != 0 {
        if caps.len() == MAX_CAPS {
            return Err(CapError::TooLong);
        }
        let out = CapError::OutOfBounds {
            offset: next,
            len: base + tail.len(),
        };
        let Some(at) = next.checked_sub(base) else {
            return Err(out);
        };
        let bytes = tail
            .get(at..)
            .filter(|b| b.len() >= HEADER)
            .ok_or(out.clone())?;
        let (Some(id), Some(version), Some(following)) =
            (u16_at(bytes, 0), u16_at(bytes, 2), u32_at(bytes, 4))
        else {
            return Err(out);
        };
        caps.push(Cap { id, version, bytes });
        next = following as usize;
    }
    Ok(caps)
}

/// `struct vfio_region_info_cap_sparse_mmap`: header, nr_areas u32, reserved u32, then
/// `{offset u64, size u64}` per area.
pub fn sparse_areas(cap: &Cap) -> Result<Vec<(u64, u64)>, CapError> {
    let short = |need| CapError::Short {
        id: cap.id,
        have: cap.bytes.len(),
        need,
    };
    let n = u32_at(cap.bytes, HEADER).ok_or(short(HEADER + 8))? as usize;
    let need = 16 + n * 16;
    if cap.bytes.len() < need {
        return Err(short(need));
    }
    Ok((0..n)
        .filter_map(|i| {
            let at = 16 + i * 16;
            Some((u64_at(cap.bytes, at)?, u64_at(cap.bytes, at + 8)?))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: u16, version: u16, next: u32) -> Vec<u8> {
        let mut v = id.to_ne_bytes().to_vec();
        v.extend(version.to_ne_bytes());
        v.extend(next.to_ne_bytes());
        v
    }

    #[test]
    fn a_chain_of_two_with_a_sparse_mmap() {
        // A 32-byte info struct, then a sparse-mmap cap (2 areas) at 32, a type cap at 80.
        let mut tail = header(1, 1, 80);
        tail.extend(2u32.to_ne_bytes());
        tail.extend(0u32.to_ne_bytes());
        for (o, s) in [(0u64, 0x1000u64), (0x3000, 0xd000)] {
            tail.extend(o.to_ne_bytes());
            tail.extend(s.to_ne_bytes());
        }
        tail.extend(header(2, 1, 0));
        tail.extend([0u8; 8]);
        let caps = walk(&tail, 32, 32).unwrap();
        assert_eq!(caps.len(), 2);
        assert_eq!((caps[0].id, caps[0].version, caps[1].id), (1, 1, 2));
        assert_eq!(
            sparse_areas(&caps[0]).unwrap(),
            vec![(0, 0x1000), (0x3000, 0xd000)]
        );
    }

    #[test]
    fn bad_chains_are_errors_not_panics() {
        let tail = header(1, 1, 8);
        assert!(matches!(
            walk(&tail, 32, 8),
            Err(CapError::OutOfBounds { .. })
        ));
        assert!(matches!(
            walk(&tail, 32, 4096),
            Err(CapError::OutOfBounds { .. })
        ));
        // A cap pointing at itself.
        let looped = header(3, 1, 32);
        assert_eq!(walk(&looped, 32, 32), Err(CapError::TooLong));
        // A sparse cap claiming more areas than were returned.
        let mut short = header(1, 1, 0);
        short.extend(9u32.to_ne_bytes());
        short.extend(0u32.to_ne_bytes());
        let caps = walk(&short, 32, 32).unwrap();
        assert!(matches!(
            sparse_areas(&caps[0]),
            Err(CapError::Short { .. })
        ));
        assert!(walk(&[], 32, 0).unwrap().is_empty());
    }
}
