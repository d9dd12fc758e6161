//! Just enough of an eBPF assembler for the programs in `programs`:
//! 64-bit ALU, loads and stores, forward jumps to the program's last
//! instruction, helper calls, map references.

/// One eBPF instruction as the kernel reads it (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

pub type Reg = u8;
pub const R0: Reg = 0;
pub const R1: Reg = 1;
pub const R2: Reg = 2;
pub const R3: Reg = 3;
pub const R4: Reg = 4;
pub const R5: Reg = 5;
pub const R6: Reg = 6;
pub const R7: Reg = 7;
/// The read-only frame pointer: the stack lies below it.
pub const R10: Reg = 10;

/// Access width of a load or store.
#[derive(Clone, Copy)]
pub enum Size {
    B = 0x10,
    H = 0x08,
    W = 0x00,
    DW = 0x18,
}

/// `off` of a jump that `Asm::finish` points at the final `exit`.
const TO_EXIT: i16 = i16::MIN;

#[derive(Default)]
pub struct Asm(Vec<Insn>);

impl Asm {
    fn op(&mut self, code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> &mut Self {
        self.0.push(Insn {
            code,
            regs: dst | src << 4,
            off,
            imm,
        });
        self
    }

    pub fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.op(0xb7, dst, 0, 0, imm)
    }

    pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.op(0xbf, dst, src, 0, 0)
    }

    pub fn add_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.op(0x07, dst, 0, 0, imm)
    }

    pub fn add(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.op(0x0f, dst, src, 0, 0)
    }

    pub fn sub(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.op(0x1f, dst, src, 0, 0)
    }

    pub fn and_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.op(0x57, dst, 0, 0, imm)
    }

    pub fn rsh_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.op(0x77, dst, 0, 0, imm)
    }

    pub fn xor_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.op(0xa7, dst, 0, 0, imm)
    }

    /// Low 16 bits of `dst` to network byte order (the rest cleared).
    pub fn be16(&mut self, dst: Reg) -> &mut Self {
        self.op(0xdc, dst, 0, 0, 16)
    }

    /// `dst = *(size *)(src + off)`
    pub fn load(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.op(0x61 | size as u8, dst, src, off, 0)
    }

    /// `*(size *)(dst + off) = src`
    pub fn store(&mut self, size: Size, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.op(0x63 | size as u8, dst, src, off, 0)
    }

    /// `*(size *)(dst + off) = imm`
    pub fn store_imm(&mut self, size: Size, dst: Reg, off: i16, imm: i32) -> &mut Self {
        self.op(0x62 | size as u8, dst, 0, off, imm)
    }

    /// Stores `bytes` at `dst + off`, four at a time.
    pub fn store_bytes(&mut self, dst: Reg, off: i16, bytes: &[u8]) -> &mut Self {
        let mut at = 0;
        while let Some(rest) = bytes.get(at..).filter(|r| !r.is_empty()) {
            let (size, n, imm) = match *rest {
                [a, b, c, d, ..] => (Size::W, 4, i32::from_le_bytes([a, b, c, d])),
                [a, b, ..] => (Size::H, 2, i32::from(u16::from_le_bytes([a, b]))),
                [a, ..] => (Size::B, 1, i32::from(a)),
                [] => unreachable!("filtered"),
            };
            self.store_imm(size, dst, off + at as i16, imm);
            at += n;
        }
        self
    }

    /// Goes to the final `exit` if the packet (`data` in `data_reg`,
    /// `data_end` in `end_reg`) is shorter than `len` bytes; clobbers `tmp`.
    pub fn exit_if_shorter(
        &mut self,
        data_reg: Reg,
        end_reg: Reg,
        len: i32,
        tmp: Reg,
    ) -> &mut Self {
        self.mov(tmp, data_reg).add_imm(tmp, len);
        // if tmp > end_reg
        self.op(0x2d, tmp, end_reg, TO_EXIT, 0)
    }

    /// Goes to the final `exit` if the low 32 bits of `reg` differ from `imm`.
    pub fn exit_if_ne32(&mut self, reg: Reg, imm: i32) -> &mut Self {
        self.op(0x56, reg, 0, TO_EXIT, imm)
    }

    /// Goes to the final `exit` if `reg` is not zero.
    pub fn exit_if_nonzero(&mut self, reg: Reg) -> &mut Self {
        self.op(0x55, reg, 0, TO_EXIT, 0)
    }

    /// Goes to the final `exit` if `reg` is zero.
    pub fn exit_if_zero(&mut self, reg: Reg) -> &mut Self {
        self.op(0x15, reg, 0, TO_EXIT, 0)
    }

    /// `dst` = the map whose file descriptor is `fd` (a two-slot `ld_imm64`
    /// the kernel resolves at load time).
    pub fn load_map(&mut self, dst: Reg, fd: i32) -> &mut Self {
        const BPF_PSEUDO_MAP_FD: Reg = 1;
        self.op(0x18, dst, BPF_PSEUDO_MAP_FD, 0, fd)
            .op(0, 0, 0, 0, 0)
    }

    pub fn call(&mut self, helper: i32) -> &mut Self {
        self.op(0x85, 0, 0, 0, helper)
    }

    /// Appends the `exit` that every early exit jumps to.
    pub fn finish(&mut self) -> Vec<Insn> {
        self.op(0x95, 0, 0, 0, 0);
        let last = self.0.len() as i16 - 1;
        for (i, insn) in self.0.iter_mut().enumerate() {
            // Only jumps (classes JMP and JMP32) carry TO_EXIT.
            if insn.off == TO_EXIT && matches!(insn.code & 0x07, 0x05 | 0x06) {
                insn.off = last - i as i16 - 1;
            }
        }
        std::mem::take(&mut self.0)
    }
}
