//! MSI (PCI 3.0 6.8.1), for a function without MSI-X: one capability holding everything (enable,
//! multiple message capable/enable, a 32- or 64-bit address, the data, and optionally per-vector
//! mask and pending bits), so its state lives in config space and [`Msi`] only knows the layout
//! and what the owner was last told.
//!
//! With multiple messages the function sends vector `i` by replacing the low bits of the data
//! with `i` (as many bits as vectors are enabled). Linux rewrites the address and data of a
//! live MSI when it moves the interrupt to another CPU, so a live vector's message change is
//! handed to the owner like an unmask.

use super::config::{Capability, ConfigError, ConfigSpace};
use super::vectors::{reconcile, Delivery, MsiMessage, RouteError, VectorRoutes};

pub const MSI_CAP_ID: u8 = 0x05;
pub const MSI_ENABLE: u16 = 1;
pub const MSI_64BIT: u16 = 1 << 7;
pub const MSI_PER_VECTOR_MASK: u16 = 1 << 8;
pub const MSI_MAX_VECTORS: u8 = 32;
const CONTROL: usize = 2;
const ADDRESS_LO: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum MsiError {
    #[error("{0} MSI vectors: must be a power of two up to {MSI_MAX_VECTORS}")]
    Vectors(u8),
    #[error("adding the MSI capability")]
    Capability(#[source] ConfigError),
    #[error("setting MSI pending bit of vector {vector}")]
    Pending {
        vector: u8,
        #[source]
        source: ConfigError,
    },
    #[error("MSI vector {0} does not exist")]
    NoVector(u8),
    #[error("reprogramming MSI vector {vector}")]
    Route {
        vector: u8,
        #[source]
        source: RouteError,
    },
}

/// A function's MSI capability. See the module comment.
#[derive(Debug, Clone)]
pub struct Msi {
    offset: usize,
    vectors: u8,
    is_64bit: bool,
    per_vector_mask: bool,
    programmed: Vec<Option<MsiMessage>>,
}

impl Msi {
    /// Adds the capability to `cfg`: `vectors` capable (1, 2, 4, .. 32), a 64-bit address if
    /// `is_64bit`, mask and pending bits if `per_vector_mask`. Starts disabled.
    pub fn new(
        cfg: &mut ConfigSpace,
        vectors: u8,
        is_64bit: bool,
        per_vector_mask: bool,
    ) -> Result<Self, MsiError> {
        let (body, mask) = capability_body(vectors, is_64bit, per_vector_mask)?;
        let offset = cfg
            .add_capability(MSI_CAP_ID, &body, &mask)
            .map_err(MsiError::Capability)?;
        Ok(Self::fresh(offset, vectors, is_64bit, per_vector_mask))
    }

    /// For a passed-through function: the capability stays where the device has it, at
    /// `offset` (its id and link bytes kept), with its body rewritten and emulated here.
    /// Starts disabled.
    pub fn at(
        cfg: &mut ConfigSpace,
        offset: usize,
        vectors: u8,
        is_64bit: bool,
        per_vector_mask: bool,
    ) -> Result<Self, MsiError> {
        let (body, mask) = capability_body(vectors, is_64bit, per_vector_mask)?;
        let body_offset = offset + CONTROL;
        cfg.set(body_offset, &body)
            .and_then(|()| cfg.set_write_mask(body_offset, &mask))
            .and_then(|()| {
                let cap = Capability {
                    id: u16::from(MSI_CAP_ID),
                    offset,
                    extended: false,
                };
                cfg.adopt_capability(cap, CONTROL + body.len())
            })
            .map_err(MsiError::Capability)?;
        Ok(Self::fresh(offset, vectors, is_64bit, per_vector_mask))
    }

    fn fresh(offset: usize, vectors: u8, is_64bit: bool, per_vector_mask: bool) -> Self {
        Self {
            offset,
            vectors,
            is_64bit,
            per_vector_mask,
            programmed: vec![None; usize::from(vectors)],
        }
    }

    /// Vectors the function is capable of.
    pub fn vectors(&self) -> u8 {
        self.vectors
    }

    /// Bytes of the capability, id and link included.
    pub fn cap_len(&self) -> usize {
        CONTROL
            + 2
            + if self.is_64bit { 8 } else { 4 }
            + 4
            + if self.per_vector_mask { 8 } else { 0 }
    }

    /// Back to power-on (a function reset): disabled, one vector enabled, message, mask and
    /// pending bits zero; `routes` is told of vectors that were live.
    pub fn reset(
        &mut self,
        cfg: &mut ConfigSpace,
        routes: &mut dyn VectorRoutes,
    ) -> Result<(), MsiError> {
        let control = cfg.read_u16(self.offset + CONTROL) & !(MSI_ENABLE | 0x70);
        cfg.set_u16(self.offset + CONTROL, control)
            .and_then(|()| {
                cfg.set(
                    self.offset + ADDRESS_LO,
                    &vec![0; self.cap_len() - ADDRESS_LO],
                )
            })
            .map_err(MsiError::Capability)?;
        self.config_written(cfg, routes)
    }

    /// Where the capability sits in config space.
    pub fn cap_offset(&self) -> usize {
        self.offset
    }

    fn data_offset(&self) -> usize {
        self.offset + if self.is_64bit { 12 } else { 8 }
    }

    fn mask_offset(&self) -> usize {
        self.data_offset() + 4
    }

    fn pending_offset(&self) -> usize {
        self.data_offset() + 8
    }

    pub fn enabled(&self, cfg: &ConfigSpace) -> bool {
        cfg.read_u16(self.offset + CONTROL) & MSI_ENABLE != 0
    }

    /// Vectors the guest enabled (multiple message enable, capped at what is capable).
    pub fn allotted(&self, cfg: &ConfigSpace) -> u8 {
        let mme = (cfg.read_u16(self.offset + CONTROL) >> 4) & 0x7;
        (1u8 << mme.min(5)).min(self.vectors)
    }

    /// Vector `vector`'s message: the capability's with the vector number in the low data bits.
    pub fn message(&self, cfg: &ConfigSpace, vector: u8) -> MsiMessage {
        let lo = u64::from(cfg.read_u32(self.offset + ADDRESS_LO));
        let hi = if self.is_64bit {
            u64::from(cfg.read_u32(self.offset + ADDRESS_LO + 4))
        } else {
            0
        };
        let data = u32::from(cfg.read_u16(self.data_offset()));
        let low_bits = u32::from(self.allotted(cfg)) - 1;
        MsiMessage {
            address: lo | hi << 32,
            data: (data & !low_bits) | (u32::from(vector) & low_bits),
        }
    }

    pub fn vector_masked(&self, cfg: &ConfigSpace, vector: u8) -> bool {
        self.per_vector_mask && cfg.read_u32(self.mask_offset()) >> vector & 1 != 0
    }

    pub fn pending(&self, cfg: &ConfigSpace, vector: u8) -> bool {
        self.per_vector_mask && cfg.read_u32(self.pending_offset()) >> vector & 1 != 0
    }

    fn set_pending(&self, cfg: &mut ConfigSpace, vector: u8, on: bool) -> Result<(), MsiError> {
        let bits = cfg.read_u32(self.pending_offset());
        let bit = 1u32 << vector;
        let bits = if on { bits | bit } else { bits & !bit };
        cfg.set_u32(self.pending_offset(), bits)
            .map_err(|source| MsiError::Pending { vector, source })
    }

    fn live(&self, cfg: &ConfigSpace, vector: u8) -> Option<MsiMessage> {
        let on =
            self.enabled(cfg) && vector < self.allotted(cfg) && !self.vector_masked(cfg, vector);
        on.then(|| self.message(cfg, vector))
    }

    /// After a guest write touched the capability: tells `routes` about every vector whose
    /// liveness or message changed, and sends pending vectors that became live.
    pub fn config_written(
        &mut self,
        cfg: &mut ConfigSpace,
        routes: &mut dyn VectorRoutes,
    ) -> Result<(), MsiError> {
        let mut first = Ok(());
        for v in 0..self.vectors {
            let now = self.live(cfg, v);
            let Some(programmed) = self.programmed.get_mut(usize::from(v)) else {
                continue;
            };
            let result = match reconcile(u16::from(v), programmed, now, routes) {
                Ok(true) if self.pending(cfg, v) => self
                    .set_pending(cfg, v, false)
                    .and_then(|()| route(v, routes.trigger(u16::from(v)))),
                Ok(_) => Ok(()),
                Err(source) => Err(MsiError::Route { vector: v, source }),
            };
            if let (Err(e), true) = (result, first.is_ok()) {
                first = Err(e);
            }
        }
        first
    }

    /// An emulated device raising `vector`: sent if live, made pending if masked (with
    /// per-vector masking), dropped if MSI is disabled or the vector not allotted.
    pub fn trigger(
        &mut self,
        cfg: &mut ConfigSpace,
        vector: u8,
        routes: &mut dyn VectorRoutes,
    ) -> Result<Delivery, MsiError> {
        if vector >= self.vectors {
            return Err(MsiError::NoVector(vector));
        }
        if !self.enabled(cfg) || vector >= self.allotted(cfg) {
            return Ok(Delivery::Dropped);
        }
        if self.vector_masked(cfg, vector) {
            self.set_pending(cfg, vector, true)?;
            return Ok(Delivery::Pending);
        }
        route(vector, routes.trigger(u16::from(vector)))?;
        Ok(Delivery::Sent)
    }
}

/// The capability's body after id and link and its write mask: enable and multiple message
/// enable, the address, the data, the mask bits of capable vectors.
fn capability_body(
    vectors: u8,
    is_64bit: bool,
    per_vector_mask: bool,
) -> Result<(Vec<u8>, Vec<u8>), MsiError> {
    if !vectors.is_power_of_two() || vectors > MSI_MAX_VECTORS {
        return Err(MsiError::Vectors(vectors));
    }
    let mut control = (vectors.trailing_zeros() as u16) << 1;
    if is_64bit {
        control |= MSI_64BIT;
    }
    if per_vector_mask {
        control |= MSI_PER_VECTOR_MASK;
    }
    // Body from message control: control (2), address (4 or 8), data (2) + 2 reserved,
    // then mask (4) and pending (4).
    let mut body = control.to_le_bytes().to_vec();
    let mut mask = vec![0x71, 0]; // enable, multiple message enable
    body.extend_from_slice(&[0; 4]);
    mask.extend_from_slice(&0xffff_fffcu32.to_le_bytes());
    if is_64bit {
        body.extend_from_slice(&[0; 4]);
        mask.extend_from_slice(&[0xff; 4]);
    }
    body.extend_from_slice(&[0; 4]);
    mask.extend_from_slice(&[0xff, 0xff, 0, 0]);
    if per_vector_mask {
        let bits = (u64::from(u32::MAX) >> (32 - u32::from(vectors))) as u32;
        body.extend_from_slice(&[0; 8]);
        mask.extend_from_slice(&bits.to_le_bytes());
        mask.extend_from_slice(&[0; 4]);
    }
    Ok((body, mask))
}

fn route(vector: u8, r: Result<(), RouteError>) -> Result<(), MsiError> {
    r.map_err(|source| MsiError::Route { vector, source })
}
