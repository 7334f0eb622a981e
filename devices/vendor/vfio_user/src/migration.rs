// SPDX-License-Identifier: Apache-2.0
//
// Patched addition (see PATCHES.md): VFIO migration v2 over vfio-user, client side and server
// dispatch.

//! Migration: the `VFIO_DEVICE_FEATURE_MIGRATION`, `_MIG_DEVICE_STATE` and `_MIG_DATA_SIZE`
//! device features (served through `VFIO_USER_DEVICE_FEATURE`, see `feature`) and the
//! `VFIO_USER_MIG_DATA_READ` / `_WRITE` commands (17, 18) that carry the device's migration
//! data, as the vfio-user specification (QEMU docs/interop/vfio-user.rst) describes them.
//!
//! The data commands carry `{ u32 argsz; u32 size }` then, in a read's reply and a write's
//! request, `size` bytes of data. A read's reply shorter than asked means the device has no
//! more data for now (PRE_COPY) or at all (STOP_COPY). Migration data moves in chunks of at
//! most [`MAX_MIG_DATA_CHUNK`], inside the 1 MiB transfer size the server advertises.

use std::io::Write;
use std::mem::size_of;
use std::os::unix::net::UnixStream;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
};
use vm_memory::ByteValued;

use crate::feature::{split, FeatureHeader};
use crate::{read_exact_by, Client, Command, Error, Header, HeaderFlags, ServerBackend};

/// The most migration data one MIG_DATA_READ or MIG_DATA_WRITE carries: the 1 MiB transfer
/// size the server advertises, less room for the header and `{ argsz, size }`.
pub const MAX_MIG_DATA_CHUNK: usize = (1 << 20) - 64;

/// `struct vfio_device_feature_mig_state`: `data_fd` is unused over vfio-user (-1).
#[repr(C)]
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
struct MigState {
    device_state: u32,
    data_fd: i32,
}

/// `struct vfio_user_mig_data` without its data.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
struct MigData {
    argsz: u32,
    size: u32,
}

// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for MigState {}
// SAFETY: data structure only contain a series of integers
unsafe impl ByteValued for MigData {}

/// Whether `error` is the server's ENOTSUP answer.
fn is_enotsup(error: &Error) -> bool {
    matches!(error, Error::ErrorReply { errno, .. } if *errno == libc::ENOTSUP as u32)
}

/// Reads a little-endian u64 that must be all of `data`.
fn exact_u64(data: &[u8]) -> Result<u64, Error> {
    let bytes: [u8; 8] = data.try_into().map_err(|_| Error::InvalidInput)?;
    Ok(u64::from_le_bytes(bytes))
}

/// A MIG_DATA_READ request: up to `max` bytes.
fn encode_read(max: u32) -> MigData {
    MigData {
        argsz: size_of::<MigData>() as u32 + max,
        size: max,
    }
}

/// Parses a MIG_DATA_READ request: the size wanted, bounded by [`MAX_MIG_DATA_CHUNK`] and by
/// the reply space `argsz` announces.
fn decode_read(body: &[u8]) -> Result<usize, Error> {
    let (request, rest) = split::<MigData>(body)?;
    let size = request.size as usize;
    let room = (request.argsz as usize).checked_sub(size_of::<MigData>());
    if !rest.is_empty() || size > MAX_MIG_DATA_CHUNK || room.is_none_or(|room| room < size) {
        return Err(Error::InvalidInput);
    }
    Ok(size)
}

/// Parses a MIG_DATA_WRITE request: its data, exactly `size` bytes, at most the bound.
fn decode_write(body: &[u8]) -> Result<&[u8], Error> {
    let (request, data) = split::<MigData>(body)?;
    if request.size as usize != data.len() || data.len() > MAX_MIG_DATA_CHUNK {
        return Err(Error::InvalidInput);
    }
    Ok(data)
}

impl Client {
    /// VFIO_DEVICE_FEATURE_MIGRATION GET: the device's `VFIO_MIGRATION_*` flags, `Ok(None)`
    /// when the server answers ENOTSUP (no migration support).
    pub fn migration_flags(&mut self) -> Result<Option<u64>, Error> {
        let flags = VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_GET;
        match self.device_feature(flags, &[], 8) {
            Ok(reply) => exact_u64(&reply).map(Some),
            Err(e) if is_enotsup(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE SET: moves the device to `state` (a
    /// `vfio_device_mig_state`); the server's errno (EINVAL for a refused transition) comes
    /// back as `Error::ErrorReply`.
    pub fn set_mig_state(&mut self, state: u32) -> Result<(), Error> {
        let request = MigState {
            device_state: state,
            data_fd: -1,
        };
        let flags = VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_SET;
        let reply = self.device_feature(flags, request.as_slice(), size_of::<MigState>())?;
        let (echo, _) = split::<MigState>(&reply)?;
        if echo.device_state != state {
            return Err(Error::UnexpectedReply {
                command: Command::DeviceFeature,
                reason: "MIG_DEVICE_STATE echo differs",
            });
        }
        Ok(())
    }

    /// VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE GET: the device's current state.
    pub fn mig_state(&mut self) -> Result<u32, Error> {
        let flags = VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_GET;
        let reply = self.device_feature(flags, &[], size_of::<MigState>())?;
        let (state, _) = split::<MigState>(&reply)?;
        Ok(state.device_state)
    }

    /// VFIO_DEVICE_FEATURE_MIG_DATA_SIZE GET: the device's estimate of the bytes STOP_COPY
    /// still has to send; `Ok(None)` when the server answers ENOTSUP.
    pub fn mig_data_size(&mut self) -> Result<Option<u64>, Error> {
        let flags = VFIO_DEVICE_FEATURE_MIG_DATA_SIZE | VFIO_DEVICE_FEATURE_GET;
        match self.device_feature(flags, &[], 8) {
            Ok(reply) => exact_u64(&reply).map(Some),
            Err(e) if is_enotsup(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// VFIO_USER_MIG_DATA_READ: up to `max` bytes of migration data (at most
    /// [`MAX_MIG_DATA_CHUNK`], `Error::InvalidInput` beyond). Fewer than `max` means no more
    /// data for now (PRE_COPY) or the end of it (STOP_COPY).
    pub fn mig_data_read(&mut self, max: u32) -> Result<Vec<u8>, Error> {
        if max as usize > MAX_MIG_DATA_CHUNK {
            return Err(Error::InvalidInput);
        }
        let command = Command::MigDataRead;
        let unexpected = |reason| Error::UnexpectedReply { command, reason };
        let message_id = self.next_id();
        let header = Header {
            message_id,
            command: command as u16,
            flags: HeaderFlags::Command as u32,
            message_size: (size_of::<Header>() + size_of::<MigData>()) as u32,
            ..Default::default()
        };
        let request = encode_read(max);
        debug!("Command: {header:?} {request:?}");
        self.write_all_of(&[header.as_slice(), request.as_slice()])?;

        let reply = self.read_reply_header(command, message_id)?;
        let body_len = (reply.message_size as usize)
            .checked_sub(size_of::<Header>())
            .filter(|&len| len >= size_of::<MigData>())
            .filter(|&len| len - size_of::<MigData>() <= max as usize)
            .ok_or(unexpected("size outside the data asked for"))?;
        let mut body = vec![0u8; body_len];
        read_exact_by(&mut self.stream, &mut body, self.deadline).map_err(Error::StreamRead)?;
        let (answer, data) = split::<MigData>(&body)?;
        if answer.size as usize != data.len() {
            return Err(unexpected("data size differs from the message size"));
        }
        Ok(data.to_vec())
    }

    /// VFIO_USER_MIG_DATA_WRITE: hands `data` (at most [`MAX_MIG_DATA_CHUNK`] bytes,
    /// `Error::InvalidInput` beyond) to a device in RESUMING.
    pub fn mig_data_write(&mut self, data: &[u8]) -> Result<(), Error> {
        if data.len() > MAX_MIG_DATA_CHUNK {
            return Err(Error::InvalidInput);
        }
        let command = Command::MigDataWrite;
        let message_id = self.next_id();
        let header = Header {
            message_id,
            command: command as u16,
            flags: HeaderFlags::Command as u32,
            message_size: (size_of::<Header>() + size_of::<MigData>() + data.len()) as u32,
            ..Default::default()
        };
        let request = MigData {
            argsz: (size_of::<MigData>() + data.len()) as u32,
            size: data.len() as u32,
        };
        debug!("Command: {header:?} {request:?}");
        self.write_all_of(&[header.as_slice(), request.as_slice(), data])?;
        let reply = self.read_reply_header(command, message_id)?;
        if reply.message_size as usize != size_of::<Header>() {
            return Err(Error::UnexpectedReply {
                command,
                reason: "reply carries data",
            });
        }
        Ok(())
    }
}

/// Serves a migration DEVICE_FEATURE (`flags` names one of them); returns the reply's data.
pub(crate) fn feature(
    backend: &mut dyn ServerBackend,
    feature: FeatureHeader,
    data: &[u8],
) -> Result<Vec<u8>, Error> {
    let index = feature.flags & VFIO_DEVICE_FEATURE_MASK;
    let probe = feature.flags & VFIO_DEVICE_FEATURE_PROBE != 0;
    let op = feature.flags & !(VFIO_DEVICE_FEATURE_MASK | VFIO_DEVICE_FEATURE_PROBE);
    let settable = match index {
        VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE => false,
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => true,
        _ => return Err(Error::UnsupportedFeature),
    };
    let op_valid = match op {
        VFIO_DEVICE_FEATURE_GET => true,
        VFIO_DEVICE_FEATURE_SET => settable,
        0 => probe,
        _ => probe && settable && op == VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET,
    };
    if !op_valid {
        return Err(Error::InvalidInput);
    }
    if probe {
        // Every migration feature is there exactly when migration is.
        backend.migration_flags().map_err(Error::Backend)?;
        return Ok(data.to_vec());
    }
    // A GET's reply must fit the space its argsz announces.
    let room = (feature.argsz as usize).saturating_sub(size_of::<FeatureHeader>());
    let reply = match (index, op) {
        (VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_SET) => {
            let (request, rest) = split::<MigState>(data)?;
            if !rest.is_empty() {
                return Err(Error::InvalidInput);
            }
            backend
                .set_mig_state(request.device_state)
                .map_err(Error::Backend)?;
            MigState {
                device_state: request.device_state,
                data_fd: -1,
            }
            .as_slice()
            .to_vec()
        }
        (VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, _) => {
            let device_state = backend.mig_state().map_err(Error::Backend)?;
            MigState {
                device_state,
                data_fd: -1,
            }
            .as_slice()
            .to_vec()
        }
        (VFIO_DEVICE_FEATURE_MIGRATION, _) => {
            let flags = backend.migration_flags().map_err(Error::Backend)?;
            flags.to_le_bytes().to_vec()
        }
        _ => {
            let size = backend.mig_data_size().map_err(Error::Backend)?;
            size.to_le_bytes().to_vec()
        }
    };
    if op == VFIO_DEVICE_FEATURE_GET && room < reply.len() {
        return Err(Error::InvalidInput);
    }
    Ok(reply)
}

/// Serves one MIG_DATA_READ (`body`: everything after the header).
pub(crate) fn handle_read(
    backend: &mut dyn ServerBackend,
    header: Header,
    body: &[u8],
    stream: &mut UnixStream,
) -> Result<(), Error> {
    if header.no_reply() {
        return Err(Error::UnexpectedNoReply(Command::MigDataRead));
    }
    let size = decode_read(body)?;
    let mut data = vec![0u8; size];
    let read = backend.mig_data_read(&mut data).map_err(Error::Backend)?;
    if read > size {
        // A backend claiming more than the buffer it was given: its bug, not the client's.
        return Err(Error::Backend(std::io::Error::from_raw_os_error(libc::EIO)));
    }
    data.truncate(read);
    let answer = MigData {
        argsz: (size_of::<MigData>() + read) as u32,
        size: read as u32,
    };
    let reply = Header {
        message_id: header.message_id,
        command: Command::MigDataRead as u16,
        flags: HeaderFlags::Reply as u32,
        message_size: (size_of::<Header>() + size_of::<MigData>() + read) as u32,
        ..Default::default()
    };
    let message = [reply.as_slice(), answer.as_slice(), &data].concat();
    stream.write_all(&message).map_err(Error::StreamWrite)
}

/// Serves one MIG_DATA_WRITE (`body`: everything after the header).
pub(crate) fn handle_write(
    backend: &mut dyn ServerBackend,
    header: Header,
    body: &[u8],
    stream: &mut UnixStream,
) -> Result<(), Error> {
    let data = decode_write(body)?;
    backend.mig_data_write(data).map_err(Error::Backend)?;
    if header.no_reply() {
        return Ok(());
    }
    let reply = Header {
        message_id: header.message_id,
        command: Command::MigDataWrite as u16,
        flags: HeaderFlags::Reply as u32,
        message_size: size_of::<Header>() as u32,
        ..Default::default()
    };
    stream
        .write_all(reply.as_slice())
        .map_err(Error::StreamWrite)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_request(argsz: u32, size: u32) -> Vec<u8> {
        MigData { argsz, size }.as_slice().to_vec()
    }

    #[test]
    fn wire_structures_have_the_spec_sizes() {
        assert_eq!(size_of::<MigState>(), 8);
        assert_eq!(size_of::<MigData>(), 8);
    }

    #[test]
    fn read_request_is_argsz_then_size() {
        let request = encode_read(4096);
        assert_eq!(&request.as_slice()[..4], &(8u32 + 4096).to_le_bytes());
        assert_eq!(&request.as_slice()[4..], &4096u32.to_le_bytes());
        assert_eq!(decode_read(request.as_slice()).unwrap(), 4096);
        let most = encode_read(MAX_MIG_DATA_CHUNK as u32);
        assert_eq!(decode_read(most.as_slice()).unwrap(), MAX_MIG_DATA_CHUNK);
    }

    #[test]
    fn read_requests_beyond_the_bounds_are_refused() {
        let over = MAX_MIG_DATA_CHUNK as u32 + 1;
        assert!(matches!(
            decode_read(&read_request(8 + over, over)),
            Err(Error::InvalidInput)
        ));
        assert!(matches!(
            decode_read(&read_request(u32::MAX, u32::MAX)),
            Err(Error::InvalidInput)
        ));
        // argsz too small for the data asked, or smaller than the structure itself.
        assert!(matches!(
            decode_read(&read_request(8 + 10, 11)),
            Err(Error::InvalidInput)
        ));
        assert!(matches!(
            decode_read(&read_request(0, 0)),
            Err(Error::InvalidInput)
        ));
        assert!(matches!(decode_read(&[0; 7]), Err(Error::InvalidInput)));
        let mut trailing = read_request(16, 8);
        trailing.push(0);
        assert!(matches!(decode_read(&trailing), Err(Error::InvalidInput)));
    }

    #[test]
    fn write_request_size_must_match_its_data() {
        let mut body = read_request(8 + 3, 3);
        body.extend_from_slice(b"abc");
        assert_eq!(decode_write(&body).unwrap(), b"abc");
        body.pop();
        assert!(matches!(decode_write(&body), Err(Error::InvalidInput)));
        let mut long = read_request(0, u32::MAX);
        long.extend_from_slice(&[0; 16]);
        assert!(matches!(decode_write(&long), Err(Error::InvalidInput)));
        assert!(matches!(decode_write(&[1, 2, 3]), Err(Error::InvalidInput)));
        let mut over = read_request(0, MAX_MIG_DATA_CHUNK as u32 + 1);
        over.resize(8 + MAX_MIG_DATA_CHUNK + 1, 0);
        assert!(matches!(decode_write(&over), Err(Error::InvalidInput)));
    }
}

#[cfg(test)]
mod over_a_socket {
    use super::*;
    use crate::{DmaMapFlags, DmaUnmapFlags, Server};
    use std::fs::File;
    use std::path::PathBuf;

    /// A device whose migration data is a byte string: reads hand out `out` in pieces,
    /// writes collect into `taken`. Only STOP (1), RUNNING (2) and STOP_COPY (3) exist.
    #[derive(Default)]
    struct Toy {
        state: u32,
        out: Vec<u8>,
        taken: Vec<u8>,
    }

    impl ServerBackend for Toy {
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
        fn set_irqs(
            &mut self,
            _: u32,
            _: u32,
            _: u32,
            _: u32,
            _: Vec<File>,
        ) -> std::io::Result<()> {
            Ok(())
        }
        fn migration_flags(&mut self) -> std::io::Result<u64> {
            Ok(1)
        }
        fn set_mig_state(&mut self, state: u32) -> std::io::Result<()> {
            if !(1..=3).contains(&state) {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.state = state;
            Ok(())
        }
        fn mig_state(&mut self) -> std::io::Result<u32> {
            Ok(self.state)
        }
        fn mig_data_size(&mut self) -> std::io::Result<u64> {
            Ok(self.out.len() as u64)
        }
        fn mig_data_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.out.len());
            buf[..n].copy_from_slice(&self.out[..n]);
            self.out.drain(..n);
            Ok(n)
        }
        fn mig_data_write(&mut self, data: &[u8]) -> std::io::Result<()> {
            self.taken.extend_from_slice(data);
            Ok(())
        }
    }

    fn socket(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("vfio-user-mig-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    fn errno(result: Result<impl std::fmt::Debug, Error>) -> u32 {
        match result {
            Err(Error::ErrorReply { errno, .. }) => errno,
            other => panic!("expected an error reply, got {other:?}"),
        }
    }

    #[test]
    fn states_and_data_travel_both_ways() {
        let path = socket("toy");
        let server = Server::new(&path, true, Vec::new(), Vec::new()).unwrap();
        let out: Vec<u8> = (0..3 * MAX_MIG_DATA_CHUNK / 2).map(|i| i as u8).collect();
        let expected = out.clone();
        let thread = std::thread::spawn(move || {
            let mut toy = Toy {
                state: 2,
                out,
                taken: Vec::new(),
            };
            server.run(&mut toy).map(|()| toy.taken)
        });
        let mut client = Client::new(&path).unwrap();

        assert_eq!(client.migration_flags().unwrap(), Some(1));
        assert_eq!(client.mig_state().unwrap(), 2);
        client.set_mig_state(3).unwrap();
        assert_eq!(client.mig_state().unwrap(), 3);
        assert_eq!(errno(client.set_mig_state(9)), libc::EINVAL as u32);
        assert_eq!(client.mig_state().unwrap(), 3);
        assert_eq!(client.mig_data_size().unwrap(), Some(expected.len() as u64));

        let max = MAX_MIG_DATA_CHUNK as u32;
        let first = client.mig_data_read(max).unwrap();
        assert_eq!(first.len(), MAX_MIG_DATA_CHUNK);
        let second = client.mig_data_read(max).unwrap();
        assert!(
            second.len() < MAX_MIG_DATA_CHUNK,
            "a short read ends the data"
        );
        assert_eq!([first, second].concat(), expected);
        assert!(client.mig_data_read(max).unwrap().is_empty());
        assert!(matches!(
            client.mig_data_read(max + 1),
            Err(Error::InvalidInput)
        ));

        client.mig_data_write(b"hello ").unwrap();
        client.mig_data_write(&[]).unwrap();
        client.mig_data_write(b"world").unwrap();
        let too_long = vec![0; MAX_MIG_DATA_CHUNK + 1];
        assert!(matches!(
            client.mig_data_write(&too_long),
            Err(Error::InvalidInput)
        ));
        // Still in step after refusals.
        assert_eq!(client.mig_state().unwrap(), 3);
        drop(client);
        assert_eq!(thread.join().unwrap().unwrap(), b"hello world");
    }

    /// A backend with only the required methods.
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
        fn set_irqs(
            &mut self,
            _: u32,
            _: u32,
            _: u32,
            _: u32,
            _: Vec<File>,
        ) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_backend_without_migration_answers_enotsup() {
        let path = socket("plain");
        let server = Server::new(&path, true, Vec::new(), Vec::new()).unwrap();
        let thread = std::thread::spawn(move || server.run(&mut Plain));
        let mut client = Client::new(&path).unwrap();
        let enotsup = libc::ENOTSUP as u32;
        assert_eq!(client.migration_flags().unwrap(), None);
        assert_eq!(client.mig_data_size().unwrap(), None);
        assert_eq!(errno(client.set_mig_state(1)), enotsup);
        assert_eq!(errno(client.mig_state()), enotsup);
        assert_eq!(errno(client.mig_data_read(16)), enotsup);
        assert_eq!(errno(client.mig_data_write(b"x")), enotsup);
        client.reset().unwrap();
        drop(client);
        thread.join().unwrap().unwrap();
    }
}
