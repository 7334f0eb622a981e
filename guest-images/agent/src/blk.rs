//! `blkread` and `blkwrite`: deterministic block I/O whose FNV-1a 64 the host can recompute
//! with `guest_abi::pattern`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use guest_abi::pattern::{fill_pattern_continue, fnv1a64_update, pattern_state, FNV1A64_OFFSET};

/// I/O size; a multiple of 8 so the pattern can be produced chunk by chunk.
const CHUNK: usize = 64 * 1024;

/// Reads `len` bytes at `offset`; returns their FNV-1a 64.
pub fn read(dev: &str, offset: u64, len: u64) -> Result<u64, String> {
    let file = File::open(dev).map_err(|e| format!("{dev}: {e}"))?;
    let mut buf = vec![0; CHUNK];
    let mut hash = FNV1A64_OFFSET;
    let mut done = 0;
    while done < len {
        let n = chunk_len(len - done);
        let pos = end_offset(offset, done)?;
        let got = file
            .read_at(&mut buf[..n], pos)
            .map_err(|e| format!("{dev}: read at {pos}: {e}"))?;
        if got == 0 {
            return Err(format!("{dev}: end of device after {done} of {len} bytes"));
        }
        hash = fnv1a64_update(hash, &buf[..got]);
        done += got as u64;
    }
    Ok(hash)
}

/// Writes `len` bytes of the pattern for `seed` at `offset`, then fsyncs; returns the FNV-1a 64
/// of what was written.
pub fn write(dev: &str, offset: u64, len: u64, seed: u64) -> Result<u64, String> {
    let file = OpenOptions::new()
        .write(true)
        .open(dev)
        .map_err(|e| format!("{dev}: {e}"))?;
    let mut buf = vec![0; CHUNK];
    let mut state = pattern_state(seed);
    let mut hash = FNV1A64_OFFSET;
    let mut done = 0;
    while done < len {
        let n = chunk_len(len - done);
        state = fill_pattern_continue(state, &mut buf[..n]);
        let pos = end_offset(offset, done)?;
        file.write_all_at(&buf[..n], pos)
            .map_err(|e| format!("{dev}: write at {pos}: {e}"))?;
        hash = fnv1a64_update(hash, &buf[..n]);
        done += n as u64;
    }
    file.sync_all().map_err(|e| format!("{dev}: fsync: {e}"))?;
    Ok(hash)
}

fn chunk_len(left: u64) -> usize {
    usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK))
}

fn end_offset(offset: u64, done: u64) -> Result<u64, String> {
    offset
        .checked_add(done)
        .ok_or_else(|| format!("offset {offset} + {done} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_abi::pattern::{fill_pattern, fnv1a64};

    fn temp_file(name: &str, size: u64) -> String {
        let path = std::env::temp_dir().join(format!("vmm-agent-{}-{name}", std::process::id()));
        let file = File::create(&path).expect("create");
        file.set_len(size).expect("size");
        path.to_string_lossy().into_owned()
    }

    #[test]
    fn write_then_read_gives_the_host_side_hash() {
        let dev = temp_file("rw", 1 << 20);
        // Unaligned offset, several chunks and a partial word at the end.
        let (off, len) = (4097, 3 * CHUNK as u64 + 13);
        let written = write(&dev, off, len, 99).expect("write");
        let mut expect = vec![0; len as usize];
        fill_pattern(99, &mut expect);
        assert_eq!(written, fnv1a64(&expect));
        assert_eq!(read(&dev, off, len), Ok(written));
        let data = std::fs::read(&dev).expect("read back");
        assert_eq!(data[off as usize..(off + len) as usize], expect[..]);
        assert!(data[..off as usize].iter().all(|&b| b == 0));
        std::fs::remove_file(&dev).expect("cleanup");
    }

    #[test]
    fn abi_pattern_and_hash_behave_as_documented() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a64_update(fnv1a64(b"foo"), b"bar"), fnv1a64(b"foobar"));

        // Successive xorshift64 states, advanced before use; seed 0 acts as 1.
        let mut buf = [0; 20];
        fill_pattern(0, &mut buf);
        let s1 = guest_abi::micro::xorshift64(1);
        let s2 = guest_abi::micro::xorshift64(s1);
        let s3 = guest_abi::micro::xorshift64(s2);
        assert_eq!(buf[..8], s1.to_le_bytes());
        assert_eq!(buf[8..16], s2.to_le_bytes());
        assert_eq!(buf[16..], s3.to_le_bytes()[..4]);
        let mut one = [0; 20];
        fill_pattern(1, &mut one);
        assert_eq!(buf, one);

        // Chunks of multiples of 8 continue the same stream.
        let mut whole = [0; 45];
        fill_pattern(7, &mut whole);
        let mut parts = [0; 45];
        let (a, rest) = parts.split_at_mut(16);
        let state = fill_pattern_continue(pattern_state(7), a);
        fill_pattern_continue(state, rest);
        assert_eq!(whole, parts);
    }

    #[test]
    fn reports_short_reads_and_missing_devices() {
        let dev = temp_file("short", 100);
        assert!(read(&dev, 50, 51)
            .expect_err("short")
            .contains("after 50 of 51"));
        assert_eq!(read(&dev, 100, 0), Ok(FNV1A64_OFFSET));
        std::fs::remove_file(&dev).expect("cleanup");
        assert!(read("/nonexistent/vdz", 0, 1).is_err());
    }
}
