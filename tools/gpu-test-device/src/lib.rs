pub mod regs {}
