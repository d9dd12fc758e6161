//! Linux 6.1's combined stack limit, checked on the built eBPF object.
//!
//! Before Linux 6.9, `check_max_stack_depth` rounds each function's frame up
//! to 32 bytes (not 16) and refuses a program when the frames along any call
//! chain add up to more than 512 bytes. The test machine's newer kernel counts
//! less, so every other test passes on an object that 6.1 refuses ("combined
//! stack size of 2 calls is 544"). This test does 6.1's sum here: for each
//! program, the worst chain through its calls, `bpf_loop` callbacks included.

use std::collections::HashMap;

use egress_user::datapath::OBJECT;
use object::{
    Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionIndex, SectionKind, SymbolKind,
};

/// MAX_BPF_STACK: what a chain's rounded frames may add up to.
const STACK_LIMIT: u32 = 512;
/// MAX_CALL_FRAMES: 6.1 refuses a chain of more functions than this.
const MAX_FRAMES: usize = 8;
const INSN: usize = 8;
const FRAME_POINTER: u8 = 10;

/// A function's place in the object, as aya-obj keys it.
type Key = (SectionIndex, u64);

struct Function {
    name: String,
    /// Bytes below r10 the function touches.
    depth: u32,
    /// Functions it calls or hands to a helper as a callback.
    callees: Vec<Key>,
}

/// 6.1's count of a frame: `round_up(max(depth, 1), 32)`.
fn counted(depth: u32) -> u32 {
    depth.max(1).div_ceil(32) * 32
}

#[test]
fn every_call_chain_fits_linux_6_1_stack_limit() {
    let file = object::File::parse(OBJECT).expect("the eBPF object parses");
    let functions = functions(&file);
    let mut programs: Vec<&Key> = functions
        .keys()
        .filter(|(section, _)| file.section_by_index(*section).unwrap().name() != Ok(".text"))
        .collect();
    programs.sort_by_key(|key| &functions[*key].name);
    for name in [
        egress_user::datapath::XDP_PROGRAM,
        egress_user::datapath::TC_PROGRAM,
    ] {
        assert!(
            programs.iter().any(|key| functions[*key].name == name),
            "program {name} not found in the object"
        );
    }

    let mut refused = Vec::new();
    for program in programs {
        let chain = worst_chain(&functions, *program, &mut Vec::new());
        // Each frame with the running total, which 6.1's message quotes where
        // it first passes the limit ("combined stack size of N calls is M").
        let mut total = 0;
        let frames: Vec<String> = chain
            .iter()
            .map(|key| {
                let f = &functions[key];
                total += counted(f.depth);
                format!(
                    "  {total:>4}  {:#} ({} bytes, counted {})",
                    rustc_demangle::demangle(&f.name),
                    f.depth,
                    counted(f.depth)
                )
            })
            .collect();
        let report = format!(
            "{}: {total} of {STACK_LIMIT} bytes on Linux 6.1 (margin {}), {} frames:\n{}",
            functions[program].name,
            i64::from(STACK_LIMIT) - i64::from(total),
            chain.len(),
            frames.join("\n")
        );
        println!("{report}");
        if total > STACK_LIMIT || chain.len() > MAX_FRAMES {
            refused.push(report);
        }
    }
    assert!(
        refused.is_empty(),
        "Linux 6.1 would refuse these programs (combined stack over {STACK_LIMIT} bytes, \
         or over {MAX_FRAMES} frames); shrink a frame on the chain or move data to a per-CPU map:\n{}",
        refused.join("\n")
    );
}

/// The chain from `key` whose counted frames add up to the most, as
/// `check_max_stack_depth` walks it: every call and every callback reference
/// (a `BPF_PSEUDO_FUNC` load, which 6.1 walks like a call: only timer
/// callbacks are left out) adds the callee's frame on top of the caller's.
fn worst_chain(functions: &HashMap<Key, Function>, key: Key, path: &mut Vec<Key>) -> Vec<Key> {
    path.push(key);
    // Past MAX_FRAMES the chain is refused anyway; stopping there also ends
    // recursion, which the verifier refuses too.
    let mut worst = path.clone();
    let sum = |c: &[Key]| c.iter().map(|k| counted(functions[k].depth)).sum::<u32>();
    if path.len() <= MAX_FRAMES {
        for callee in &functions[&key].callees {
            let chain = worst_chain(functions, *callee, path);
            if sum(&chain) > sum(&worst) || chain.len() > MAX_FRAMES {
                worst = chain;
            }
        }
    }
    path.pop();
    worst
}

/// Every function symbol in an executable section, with its frame depth and
/// callees.
fn functions(file: &object::File) -> HashMap<Key, Function> {
    let mut functions = HashMap::new();
    for symbol in file.symbols() {
        let Some(section) = symbol.section_index() else {
            continue;
        };
        let sec = file.section_by_index(section).unwrap();
        if symbol.kind() != SymbolKind::Text || sec.kind() != SectionKind::Text {
            continue;
        }
        let code = sec.data().unwrap();
        let start = symbol.address() as usize;
        let body = &code[start..start + symbol.size() as usize];
        functions.insert(
            (section, symbol.address()),
            Function {
                name: symbol.name().unwrap().to_owned(),
                depth: frame_depth(body),
                callees: callees(file, &sec, start, body),
            },
        );
    }
    for f in functions.values() {
        for callee in &f.callees {
            assert!(
                functions.contains_key(callee),
                "{} refers to no known function at {callee:?}",
                f.name
            );
        }
    }
    functions
}

/// How far below the frame pointer (r10) a function reaches: the most
/// negative offset of a load or store based on r10, or of a pointer made as
/// `rX = r10; rX += -N` (the stack memory handed to a helper).
fn frame_depth(body: &[u8]) -> u32 {
    let mut depth = 0;
    // Registers holding a copy of r10 (indexed by the 4-bit register field).
    let mut copies = [false; 16];
    for insn in body.as_chunks::<INSN>().0 {
        let (code, dst, src) = (insn[0], insn[1] & 0xf, insn[1] >> 4);
        let off = i16::from_le_bytes([insn[2], insn[3]]);
        let imm = i32::from_le_bytes(insn[4..8].try_into().unwrap());
        let below = |n: i64| u32::try_from(-n).unwrap_or(0);
        match code & 0x07 {
            // LDX from r10.
            0x01 if src == FRAME_POINTER => depth = depth.max(below(off.into())),
            // ST or STX (atomics too) to r10.
            0x02 | 0x03 if dst == FRAME_POINTER => depth = depth.max(below(off.into())),
            _ => {}
        }
        match code {
            // rX = r10
            0xbf if src == FRAME_POINTER => {
                copies[usize::from(dst)] = true;
                continue;
            }
            // rX += imm
            0x07 if copies[usize::from(dst)] => {
                depth = depth.max(below(imm.into()));
                continue;
            }
            // A call leaves r0-r5 undefined or a result.
            0x85 => {
                copies[..6].fill(false);
                continue;
            }
            _ => {}
        }
        // Anything else writing rX (a move, a load, a 64-bit constant) ends
        // the copy; stores and jumps name a register they do not write.
        let writes = matches!(code & 0x07, 0x00 | 0x01 | 0x04 | 0x07);
        if writes {
            copies[usize::from(dst)] = false;
        }
    }
    depth
}

/// The functions a function calls or references, resolved as aya-obj's
/// `relocate_calls` does: through a relocation against a function symbol or
/// its section, else (a call within the same section) by the pc-relative imm.
fn callees(file: &object::File, sec: &object::Section, start: usize, body: &[u8]) -> Vec<Key> {
    let relocations: HashMap<u64, object::Relocation> = sec.relocations().collect();
    let mut callees = Vec::new();
    for (n, insn) in body.as_chunks::<INSN>().0.iter().enumerate() {
        let at = (start + n * INSN) as u64;
        let imm = i64::from(i32::from_le_bytes(insn[4..8].try_into().unwrap()));
        // JMP|CALL with src_reg BPF_PSEUDO_CALL: a call to a BPF function.
        let is_call = insn[0] == 0x85 && insn[1] >> 4 == 1;
        let target = relocations.get(&at).and_then(|rel| match rel.target() {
            RelocationTarget::Symbol(index) => {
                let symbol = file.symbol_by_index(index).ok()?;
                let section = symbol.section_index()?;
                let executable = file.section_by_index(section).ok()?.kind() == SectionKind::Text;
                let address = match symbol.kind() {
                    SymbolKind::Text => symbol.address(),
                    // R_BPF_64_32 against a section: a call, pc-relative.
                    SymbolKind::Section if rel.size() == 32 => symbol
                        .address()
                        .wrapping_add_signed((imm + 1) * INSN as i64),
                    // R_BPF_64_64 against a section: a ld_imm64 of a function.
                    SymbolKind::Section if rel.size() == 64 => {
                        symbol.address().wrapping_add_signed(imm)
                    }
                    _ => return None,
                };
                executable.then_some((section, address))
            }
            _ => None,
        });
        match target {
            Some(key) => callees.push(key),
            None if is_call => {
                callees.push((sec.index(), at.wrapping_add_signed((imm + 1) * INSN as i64)))
            }
            None => {}
        }
    }
    callees
}
