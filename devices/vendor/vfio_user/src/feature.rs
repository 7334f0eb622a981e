// SPDX-License-Identifier: Apache-2.0
//
// Patched addition (see PATCHES.md): VFIO_USER_DEVICE_FEATURE (command 16) for the DMA
// logging features of linux/vfio.h, client side and server dispatch.

//! `VFIO_USER_DEVICE_FEATURE` with `VFIO_DEVICE_FEATURE_DMA_LOGGING_{START,STOP,REPORT}`.
//!
//! Every message is `struct vfio_device_feature { argsz, flags }` followed by the feature's
//! data. Over vfio-user the ranges of DMA_LOGGING_START follow its control structure inline,
//! and the bitmap of DMA_LOGGING_REPORT comes back in the reply, after an echo of the request
//! (bit `n` of the little-endian bitmap is the `n`th page of the window).

use std::io::Write;
use std::mem::size_of;
use std::os::unix::net::UnixStream;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
};
use vm_memory::ByteValued;

use crate::{read_exact_by, Client, Command, Error, Header, HeaderFlags, ServerBackend};

/// The most ranges one DMA_LOGGING_START may carry (client and server refuse more).
pub const MAX_DMA_LOGGING_RANGES: usize = 1024;

/// The largest bitmap one DMA_LOGGING_REPORT may ask for: 256 KiB, 2 Mi pages (8 GiB of 4 KiB
/// pages). Well inside the 1 MiB transfer size; a larger window takes several reports.
pub const MAX_DMA_LOGGING_BITMAP: usize = 256 * 1024;

/// One IOVA range to log (`struct vfio_device_feature_dma_logging_range`).
#[repr(C)]
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaLoggingRange {
    pub iova: u64,
    pub length: u64,
}

/// `struct vfio_device_feature` without its flexible data.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct FeatureHeader {
    pub(crate) argsz: u32,
    pub(crate) flags: u32,
}

/// `struct vfio_device_feature_dma_logging_control` without its ranges pointer.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct LoggingControl {
    page_size: u64,
    num_ranges: u32,
    reserved: u32,
}

/// `struct vfio_device_feature_dma_logging_report` without its bitmap pointer.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
struct LoggingReport {
    iova: u64,
    length: u64,
    page_size: u64,
}

// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for DmaLoggingRange {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for FeatureHeader {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for LoggingControl {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for LoggingReport {}

/// Bytes of the bitmap for `length` bytes of IOVA at `page_size` (whole u64 words), or `None`
/// if `page_size` is 0 or the bitmap would exceed [`MAX_DMA_LOGGING_BITMAP`].
pub fn dma_logging_bitmap_len(length: u64, page_size: u64) -> Option<usize> {
    if page_size == 0 {
        return None;
    }
    let words = length.div_ceil(page_size).div_ceil(64);
    usize::try_from(words.checked_mul(8)?)
        .ok()
        .filter(|&len| len <= MAX_DMA_LOGGING_BITMAP)
}

/// Reads a `T` from the front of `data`; the rest follows.
pub(crate) fn split<T: ByteValued + Default>(data: &[u8]) -> Result<(T, &[u8]), Error> {
    let head = data.get(..size_of::<T>()).ok_or(Error::InvalidInput)?;
    let mut value = T::default();
    value.as_mut_slice().copy_from_slice(head);
    Ok((value, &data[size_of::<T>()..]))
}

/// DMA_LOGGING_START's data: the control structure, then the ranges inline.
fn encode_start(page_size: u64, ranges: &[DmaLoggingRange]) -> Result<Vec<u8>, Error> {
    if ranges.len() > MAX_DMA_LOGGING_RANGES {
        return Err(Error::InvalidInput);
    }
    let control = LoggingControl {
        page_size,
        num_ranges: ranges.len() as u32,
        reserved: 0,
    };
    let mut data = control.as_slice().to_vec();
    for range in ranges {
        data.extend_from_slice(range.as_slice());
    }
    Ok(data)
}

/// Parses DMA_LOGGING_START's data: exactly `num_ranges` ranges, at most the bound.
fn decode_start(data: &[u8]) -> Result<(u64, Vec<DmaLoggingRange>), Error> {
    let (control, mut rest) = split::<LoggingControl>(data)?;
    let count = control.num_ranges as usize;
    if count > MAX_DMA_LOGGING_RANGES || rest.len() != count * size_of::<DmaLoggingRange>() {
        return Err(Error::InvalidInput);
    }
    let mut ranges = Vec::with_capacity(count);
    while !rest.is_empty() {
        let (range, next) = split::<DmaLoggingRange>(rest)?;
        ranges.push(range);
        rest = next;
    }
    Ok((control.page_size, ranges))
}

impl Client {
    /// Sends a DEVICE_FEATURE with `flags` and `data`, announcing a reply of `reply_len` data
    /// bytes; returns the reply's data, which must be exactly that long.
    pub(crate) fn device_feature(
        &mut self,
        flags: u32,
        data: &[u8],
        reply_len: usize,
    ) -> Result<Vec<u8>, Error> {
        let command = Command::DeviceFeature;
        let unexpected = |reason| Error::UnexpectedReply { command, reason };
        let argsz = u32::try_from(size_of::<FeatureHeader>() + data.len().max(reply_len))
            .map_err(|_| Error::InvalidInput)?;
        let message_id = self.next_id();
        let header = Header {
            message_id,
            command: command as u16,
            flags: HeaderFlags::Command as u32,
            message_size: (size_of::<Header>() + size_of::<FeatureHeader>() + data.len()) as u32,
            ..Default::default()
        };
        let feature = FeatureHeader { argsz, flags };
        debug!("Command: {header:?} {feature:?}");
        self.write_all_of(&[header.as_slice(), feature.as_slice(), data])?;

        let reply = self.read_reply_header(command, message_id)?;
        if reply.message_size as usize != size_of::<Header>() + size_of::<FeatureHeader>() + reply_len
        {
            return Err(unexpected("size differs from the one expected"));
        }
        let mut body = vec![0u8; size_of::<FeatureHeader>() + reply_len];
        read_exact_by(&mut self.stream, &mut body, self.deadline).map_err(Error::StreamRead)?;
        let (echo, rest) = split::<FeatureHeader>(&body)?;
        if echo.flags != flags {
            return Err(unexpected("feature flags differ"));
        }
        Ok(rest.to_vec())
    }

    /// Whether the server supports DMA logging (a PROBE of DMA_LOGGING_START with SET).
    /// `Ok(false)` when it answers ENOTSUP.
    pub fn dma_logging_probe(&mut self) -> Result<bool, Error> {
        let flags = VFIO_DEVICE_FEATURE_DMA_LOGGING_START
            | VFIO_DEVICE_FEATURE_PROBE
            | VFIO_DEVICE_FEATURE_SET;
        match self.device_feature(flags, &[], 0) {
            Ok(_) => Ok(true),
            Err(Error::ErrorReply { errno, .. }) if errno == libc::ENOTSUP as u32 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Starts logging the device's DMA writes into `ranges`, at `page_size` (a hint); returns
    /// the page size the server chose.
    pub fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[DmaLoggingRange],
    ) -> Result<u64, Error> {
        let data = encode_start(page_size, ranges)?;
        let flags = VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_SET;
        let reply = self.device_feature(flags, &data, data.len())?;
        let (chosen, echoed) = decode_start(&reply).map_err(|_| Error::UnexpectedReply {
            command: Command::DeviceFeature,
            reason: "malformed DMA_LOGGING_START echo",
        })?;
        if echoed != ranges || !chosen.is_power_of_two() {
            return Err(Error::UnexpectedReply {
                command: Command::DeviceFeature,
                reason: "DMA_LOGGING_START echo differs or has no valid page size",
            });
        }
        Ok(chosen)
    }

    /// Stops DMA logging.
    pub fn dma_logging_stop(&mut self) -> Result<(), Error> {
        let flags = VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP | VFIO_DEVICE_FEATURE_SET;
        self.device_feature(flags, &[], 0)?;
        Ok(())
    }

    /// The pages of `[iova, iova + length)` the device wrote since logging started or the last
    /// report of them, one bit per `page_size` bytes (page `n` is bit `n % 8` of byte `n / 8`);
    /// the server clears what it reports. The bitmap is whole
    /// u64 words, at most [`MAX_DMA_LOGGING_BITMAP`] bytes (`Error::InvalidInput` beyond, or
    /// for a page size of 0); bits past the window are checked to be zero.
    pub fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u8>, Error> {
        let bitmap_len = dma_logging_bitmap_len(length, page_size).ok_or(Error::InvalidInput)?;
        let report = LoggingReport {
            iova,
            length,
            page_size,
        };
        let flags = VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT | VFIO_DEVICE_FEATURE_GET;
        let reply =
            self.device_feature(flags, report.as_slice(), size_of::<LoggingReport>() + bitmap_len)?;
        let (echo, bitmap) = split::<LoggingReport>(&reply)?;
        let pages = length.div_ceil(page_size);
        let stray = bitmap
            .iter()
            .enumerate()
            .any(|(byte, bits)| (0..8).any(|bit| bits & (1 << bit) != 0 && (byte * 8 + bit) as u64 >= pages));
        if echo != report || stray {
            return Err(Error::UnexpectedReply {
                command: Command::DeviceFeature,
                reason: "DMA_LOGGING_REPORT echo differs or bits past the window",
            });
        }
        Ok(bitmap.to_vec())
    }
}

/// Serves one DEVICE_FEATURE command (`body`: everything after the header).
pub(crate) fn handle(
    backend: &mut dyn ServerBackend,
    header: Header,
    body: &[u8],
    stream: &mut UnixStream,
) -> Result<(), Error> {
    if header.no_reply() {
        return Err(Error::UnexpectedNoReply(Command::DeviceFeature));
    }
    let (feature, data) = split::<FeatureHeader>(body)?;
    let reply = match feature.flags & VFIO_DEVICE_FEATURE_MASK {
        VFIO_DEVICE_FEATURE_MIGRATION
        | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
        | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE => crate::migration::feature(backend, feature, data)?,
        _ => dma_logging(backend, feature, data)?,
    };
    let size = size_of::<FeatureHeader>() + reply.len();
    let header = Header {
        message_id: header.message_id,
        command: Command::DeviceFeature as u16,
        flags: HeaderFlags::Reply as u32,
        message_size: (size_of::<Header>() + size) as u32,
        ..Default::default()
    };
    let feature = FeatureHeader {
        argsz: size as u32,
        flags: feature.flags,
    };
    let message = [header.as_slice(), feature.as_slice(), &reply].concat();
    stream.write_all(&message).map_err(Error::StreamWrite)
}

/// Serves a DMA logging feature (or answers an unknown one); returns the reply's data.
fn dma_logging(
    backend: &mut dyn ServerBackend,
    feature: FeatureHeader,
    data: &[u8],
) -> Result<Vec<u8>, Error> {
    let index = feature.flags & VFIO_DEVICE_FEATURE_MASK;
    let probe = feature.flags & VFIO_DEVICE_FEATURE_PROBE != 0;
    let op = feature.flags & !(VFIO_DEVICE_FEATURE_MASK | VFIO_DEVICE_FEATURE_PROBE);
    let wanted = match index {
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
            VFIO_DEVICE_FEATURE_SET
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => VFIO_DEVICE_FEATURE_GET,
        _ => return Err(Error::UnsupportedFeature),
    };
    if op != wanted && !(probe && op == 0) {
        return Err(Error::InvalidInput);
    }
    let reply = if probe {
        backend.dma_logging_probe().map_err(Error::Backend)?;
        data.to_vec()
    } else {
        match index {
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START => {
                let (page_size, ranges) = decode_start(data)?;
                let chosen = backend
                    .dma_logging_start(page_size, &ranges)
                    .map_err(Error::Backend)?;
                encode_start(chosen, &ranges)?
            }
            VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
                backend.dma_logging_stop().map_err(Error::Backend)?;
                data.to_vec()
            }
            _ => {
                let (report, _) = split::<LoggingReport>(data)?;
                let bitmap_len = dma_logging_bitmap_len(report.length, report.page_size)
                    .ok_or(Error::InvalidInput)?;
                let needed = size_of::<FeatureHeader>() + size_of::<LoggingReport>() + bitmap_len;
                if (feature.argsz as usize) < needed {
                    return Err(Error::InvalidInput);
                }
                let mut reply = report.as_slice().to_vec();
                reply.resize(size_of::<LoggingReport>() + bitmap_len, 0);
                backend
                    .dma_logging_report(
                        report.iova,
                        report.length,
                        report.page_size,
                        &mut reply[size_of::<LoggingReport>()..],
                    )
                    .map_err(Error::Backend)?;
                reply
            }
        }
    };
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(iova: u64, length: u64) -> DmaLoggingRange {
        DmaLoggingRange { iova, length }
    }

    #[test]
    fn start_data_is_control_then_ranges_inline() {
        let ranges = [range(0x1000, 0x2000), range(0x10_0000, 0x1000)];
        let data = encode_start(4096, &ranges).unwrap();
        assert_eq!(data.len(), 16 + 2 * 16);
        assert_eq!(&data[..8], &4096u64.to_le_bytes());
        assert_eq!(&data[8..12], &2u32.to_le_bytes());
        assert_eq!(&data[12..16], &[0; 4]);
        assert_eq!(&data[16..24], &0x1000u64.to_le_bytes());
        assert_eq!(&data[24..32], &0x2000u64.to_le_bytes());
        assert_eq!(&data[32..40], &0x10_0000u64.to_le_bytes());
        assert_eq!(decode_start(&data).unwrap(), (4096, ranges.to_vec()));
    }

    #[test]
    fn start_data_with_a_wrong_range_count_is_refused() {
        let mut data = encode_start(4096, &[range(0, 0x1000)]).unwrap();
        data.truncate(data.len() - 1);
        assert!(matches!(decode_start(&data), Err(Error::InvalidInput)));
        let mut data = encode_start(4096, &[range(0, 0x1000)]).unwrap();
        data[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_start(&data), Err(Error::InvalidInput)));
        assert!(matches!(decode_start(&[0; 15]), Err(Error::InvalidInput)));
        let too_many = vec![range(0, 1); MAX_DMA_LOGGING_RANGES + 1];
        assert!(matches!(encode_start(4096, &too_many), Err(Error::InvalidInput)));
    }

    #[test]
    fn bitmap_length_is_whole_words_and_bounded() {
        assert_eq!(dma_logging_bitmap_len(4096, 4096), Some(8));
        assert_eq!(dma_logging_bitmap_len(65 * 4096, 4096), Some(16));
        assert_eq!(dma_logging_bitmap_len(1, 4096), Some(8));
        assert_eq!(dma_logging_bitmap_len(0, 4096), Some(0));
        assert_eq!(dma_logging_bitmap_len(4096, 0), None);
        let most = (MAX_DMA_LOGGING_BITMAP as u64) * 8 * 4096;
        assert_eq!(
            dma_logging_bitmap_len(most, 4096),
            Some(MAX_DMA_LOGGING_BITMAP)
        );
        assert_eq!(dma_logging_bitmap_len(most + 1, 4096), None);
        assert_eq!(dma_logging_bitmap_len(u64::MAX, 1), None);
    }

    #[test]
    fn wire_structures_have_the_kernel_sizes() {
        assert_eq!(size_of::<FeatureHeader>(), 8);
        assert_eq!(size_of::<LoggingControl>(), 16);
        assert_eq!(size_of::<DmaLoggingRange>(), 16);
        assert_eq!(size_of::<LoggingReport>(), 24);
    }
}

#[cfg(test)]
mod defaults {
    use super::*;
    use crate::{DmaMapFlags, DmaUnmapFlags, Server};
    use std::fs::File;

    /// A backend without DMA logging: only the required methods.
    struct Plain;

    impl ServerBackend for Plain {
        fn region_read(&mut self, _: u32, _: u64, _: &mut [u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn dma_map(
            &mut self,
            _: DmaMapFlags,
            _: u64,
            _: u64,
            _: u64,
            _: Option<File>,
        ) -> std::io::Result<()> {
            Ok(())
        }
        fn dma_unmap(&mut self, _: DmaUnmapFlags, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn reset(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn set_irqs(&mut self, _: u32, _: u32, _: u32, _: u32, _: Vec<File>) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_backend_without_dma_logging_answers_enotsup_and_stays_in_step() {
        let path = std::env::temp_dir().join(format!(
            "vfio-user-feature-test-{}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let server = Server::new(&path, true, Vec::new(), Vec::new()).unwrap();
        let thread = std::thread::spawn(move || server.run(&mut Plain));
        let mut client = Client::new(&path).unwrap();
        let enotsup = |result: Result<(), Error>| {
            matches!(result, Err(Error::ErrorReply { command: Command::DeviceFeature, errno })
                if errno == libc::ENOTSUP as u32)
        };
        assert!(!client.dma_logging_probe().unwrap());
        let range = DmaLoggingRange {
            iova: 0,
            length: 0x1000,
        };
        assert!(enotsup(client.dma_logging_start(0x1000, &[range]).map(drop)));
        assert!(enotsup(client.dma_logging_stop()));
        assert!(enotsup(client.dma_logging_report(0, 0x1000, 0x1000).map(drop)));
        client.reset().unwrap();
        drop(client);
        thread.join().unwrap().unwrap();
    }
}
