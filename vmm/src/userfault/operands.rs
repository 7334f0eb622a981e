//! The memory operands of one guest instruction, for exits that carry no address: an
//! emulation failure on an instruction KVM cannot emulate (SSE/AVX loads and stores, ...) that
//! touched a page in no memslot. Decoding is iced-x86's; this computes linear addresses from
//! the vCPU's registers.

use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};

/// Why an instruction's memory accesses cannot be known.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OperandError {
    #[error("cannot decode the instruction bytes {bytes:02x?}")]
    Undecodable { bytes: Vec<u8> },
    #[error(
        "{mnemonic:?} (bytes {bytes:02x?}): a gather/scatter, whose addresses depend on vector registers"
    )]
    Gather { mnemonic: Mnemonic, bytes: Vec<u8> },
    #[error("{mnemonic:?} (bytes {bytes:02x?}): cannot compute the address")]
    Address { mnemonic: Mnemonic, bytes: Vec<u8> },
}

/// One memory access of the instruction: linear address and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemAccess {
    pub linear: u64,
    pub len: u64,
}

fn gpr(regs: &kvm_regs, full: Register) -> Option<u64> {
    Some(match full {
        Register::RAX => regs.rax,
        Register::RBX => regs.rbx,
        Register::RCX => regs.rcx,
        Register::RDX => regs.rdx,
        Register::RSI => regs.rsi,
        Register::RDI => regs.rdi,
        Register::RBP => regs.rbp,
        Register::RSP => regs.rsp,
        Register::R8 => regs.r8,
        Register::R9 => regs.r9,
        Register::R10 => regs.r10,
        Register::R11 => regs.r11,
        Register::R12 => regs.r12,
        Register::R13 => regs.r13,
        Register::R14 => regs.r14,
        Register::R15 => regs.r15,
        Register::RIP => regs.rip,
        _ => return None,
    })
}

fn value(regs: &kvm_regs, sregs: &kvm_sregs, reg: Register) -> Option<u64> {
    match reg {
        Register::ES => return Some(sregs.es.base),
        Register::CS => return Some(sregs.cs.base),
        Register::SS => return Some(sregs.ss.base),
        Register::DS => return Some(sregs.ds.base),
        Register::FS => return Some(sregs.fs.base),
        Register::GS => return Some(sregs.gs.base),
        Register::AH | Register::BH | Register::CH | Register::DH => {
            return gpr(regs, reg.full_register()).map(|v| (v >> 8) & 0xff)
        }
        _ => {}
    }
    let v = gpr(regs, reg.full_register())?;
    Some(match reg.size() {
        1 => v & 0xff,
        2 => v & 0xffff,
        4 => v & 0xffff_ffff,
        _ => v,
    })
}

/// Decodes `bytes` (the instruction at `regs.rip`) and returns its explicit memory accesses.
/// Errors say why the accesses cannot be known (undecodable, or a vector-indexed gather).
pub fn memory_accesses(
    bytes: &[u8],
    bitness: u32,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Result<Vec<MemAccess>, OperandError> {
    let mut decoder = Decoder::with_ip(bitness, bytes, regs.rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        return Err(OperandError::Undecodable {
            bytes: bytes.to_vec(),
        });
    }
    let mut out = Vec::new();
    for op in 0..instr.op_count() {
        if instr.op_kind(op) != OpKind::Memory {
            continue;
        }
        if instr.is_vsib() {
            return Err(OperandError::Gather {
                mnemonic: instr.mnemonic(),
                bytes: bytes.to_vec(),
            });
        }
        let linear = instr
            .virtual_address(op, 0, |reg, _, _| value(regs, sregs, reg))
            .ok_or_else(|| OperandError::Address {
                mnemonic: instr.mnemonic(),
                bytes: bytes.to_vec(),
            })?;
        let len = (instr.memory_size().size() as u64).max(1);
        out.push(MemAccess { linear, len });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_and_avx_operands_are_found() {
        let regs = kvm_regs {
            rip: 0x7ff7_83b1_0455,
            rax: 0x1000,
            rcx: 0x2000,
            ..Default::default()
        };
        let sregs = kvm_sregs::default();
        // punpckldq xmm0, [rip-0x4514d] (seen on a restored Linux guest): RIP-relative, 16 bytes.
        let a = memory_accesses(
            &[0x66, 0x0f, 0x62, 0x05, 0xb3, 0xae, 0xfb, 0xff],
            64,
            &regs,
            &sregs,
        )
        .unwrap();
        assert_eq!(
            a,
            vec![MemAccess {
                linear: 0x7ff7_83b1_0455 + 8 - 0x4_514d,
                len: 16
            }]
        );
        // vmovdqu ymm0, [rax+rcx*2]: 32 bytes.
        let b = memory_accesses(&[0xc5, 0xfe, 0x6f, 0x04, 0x48], 64, &regs, &sregs).unwrap();
        assert_eq!(
            b,
            vec![MemAccess {
                linear: 0x5000,
                len: 32
            }]
        );
        // A register-only instruction has none; junk is refused.
        assert!(
            memory_accesses(&[0x66, 0x0f, 0xef, 0xc0], 64, &regs, &sregs)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            memory_accesses(&[0x0f, 0xff], 64, &regs, &sregs),
            Err(OperandError::Undecodable {
                bytes: vec![0x0f, 0xff]
            })
        );
        // vpgatherdd xmm0, [rax+xmm1*4], xmm2: addresses from a vector register.
        let gather = memory_accesses(&[0xc4, 0xe2, 0x69, 0x90, 0x04, 0x88], 64, &regs, &sregs);
        assert!(
            matches!(gather, Err(OperandError::Gather { .. })),
            "{gather:?}"
        );
    }
}
