//! A libtest run's output read back: which tests passed and failed, and
//! the failures' output made short enough to print in CI's log.

use std::path::Path;

/// What libtest said about each test.
#[derive(Debug, Default)]
pub struct Results<'a> {
    pub passed: Vec<&'a str>,
    pub failed: Vec<&'a str>,
    /// Each failed test's captured output, in order.
    outputs: Vec<(&'a str, Vec<&'a str>)>,
}

/// A verifier's log of a refused program runs to thousands of lines; it
/// says what it refused and why in its last few.
const VERDICT_LINES: usize = 12;
/// Any other output longer than both is cut to its start and its end.
const HEAD_LINES: usize = 12;
const TAIL_LINES: usize = 40;

impl<'a> Results<'a> {
    pub fn parse(text: &'a str) -> Self {
        let mut results = Self::default();
        let mut current: Option<(&str, Vec<&str>)> = None;
        for line in text.lines() {
            // "test NAME ... ok <1.234s>"
            if let Some((name, verdict)) = line
                .strip_prefix("test ")
                .and_then(|rest| rest.split_once(" ... "))
            {
                match verdict.split_whitespace().next() {
                    Some("ok") => results.passed.push(name),
                    Some("FAILED") => results.failed.push(name),
                    _ => {}
                }
            } else if let Some(name) = line
                .strip_prefix("---- ")
                .and_then(|l| l.strip_suffix(" stdout ----"))
            {
                results.outputs.extend(current.take());
                current = Some((name, Vec::new()));
            } else if line == "failures:" || line.starts_with("test result:") {
                results.outputs.extend(current.take());
            } else if let Some((_, lines)) = current.as_mut() {
                lines.push(line);
            }
        }
        results.outputs.extend(current);
        results
    }

    pub fn ran(&self, name: &str) -> bool {
        self.passed.contains(&name) || self.failed.contains(&name)
    }

    /// Each failure's output, shortened; failures that say the same (the
    /// same program refused for the same reason, say) printed once.
    pub fn failure_report(&self, heading: &str, log: &Path) -> String {
        let mut groups: Vec<(Vec<&str>, Vec<String>)> = Vec::new();
        for (name, lines) in &self.outputs {
            let blank = |l: &&str| l.trim().is_empty();
            let first = lines.iter().position(|l| !blank(l)).unwrap_or(lines.len());
            let last = lines
                .iter()
                .rposition(|l| !blank(l))
                .map_or(first, |i| i + 1);
            let shown = shorten(&lines[first..last], log);
            match groups.iter_mut().find(|(_, s)| alike(s, &shown)) {
                Some((names, _)) => names.push(name),
                None => groups.push((vec![name], shown)),
            }
        }
        let mut report = String::new();
        for (names, shown) in groups {
            report.push_str(&format!("---- {} {heading} ----\n", names.join(", ")));
            for line in shown {
                report.push_str(&line);
                report.push('\n');
            }
        }
        report
    }
}

/// The same output but for what changes from run to run: the lines that
/// name the test or its scratch directory, libtest's note after the first
/// panic, the verifier's time, kernel addresses.
fn alike(a: &[String], b: &[String]) -> bool {
    let significant = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| {
                !l.starts_with("thread '")
                    && !l.starts_with("note: run with `RUST_BACKTRACE")
                    && !l.starts_with("logs kept in ")
                    && !l.contains("verification time")
            })
            .map(|l| mask_addresses(l))
            .collect()
    };
    significant(a) == significant(b)
}

/// `line` with each hexadecimal number of 12 digits or more (a kernel
/// address, as the verifier prints a map's) as `0x_`.
fn mask_addresses(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = rest.find("0x") {
        let digits = rest[at + 2..]
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(rest.len() - at - 2);
        out.push_str(&rest[..at + 2]);
        if digits >= 12 {
            out.push('_');
        } else {
            out.push_str(&rest[at + 2..at + 2 + digits]);
        }
        rest = &rest[at + 2 + digits..];
    }
    out.push_str(rest);
    out
}

/// A verifier's log cut to its first line and its verdict; other long
/// output to its start and end.
fn shorten(lines: &[&str], log: &Path) -> Vec<String> {
    let owned = |part: &[&str]| part.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    let left_out = |n: usize, what: &str| {
        format!(
            "[... {n} lines of {what} left out; the whole output: {} ...]",
            log.display()
        )
    };
    if let Some(start) = lines.iter().position(|l| l.contains("Verifier output:")) {
        // The log's lines are indented under their cause ("    0: ..."); the
        // next cause, or the end, closes it.
        let end = lines[start + 1..]
            .iter()
            .position(|l| !l.starts_with("     "))
            .map_or(lines.len(), |i| start + 1 + i);
        let verdict = end.saturating_sub(VERDICT_LINES).max(start + 1);
        let mut shown = owned(&lines[..=start]);
        if verdict > start + 1 {
            shown.push(left_out(verdict - start - 1, "the verifier's log"));
        }
        shown.extend(owned(&lines[verdict..]));
        return shown;
    }
    if lines.len() <= HEAD_LINES + TAIL_LINES {
        return owned(lines);
    }
    let mut shown = owned(&lines[..HEAD_LINES]);
    shown.push(left_out(lines.len() - HEAD_LINES - TAIL_LINES, "output"));
    shown.extend(owned(&lines[lines.len() - TAIL_LINES..]));
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test's output as libtest prints it when the verifier refused the
    /// XDP program, its log shortened to `log_lines` lines and the last few.
    fn refused(name: &str, thread: u32, address: &str, usec: u32, log_lines: u32) -> String {
        let log: String = (2..log_lines)
            .map(|i| format!("       {i}: (b7) r0 = 0\n"))
            .collect();
        format!(
            "---- {name} stdout ----

thread '{name}' ({thread}) panicked at tests/tests/packets/gateway.rs:157:48:
called `Result::unwrap()` on an `Err` value: the kernel verifier rejected the XDP program

Caused by:
    0: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: 0: R1=ctx(off=0,imm=0) R10=fp0
       1: (18) r2 = {address}
{log}       2719: (71) r8 = *(u8 *)(r2 +0)
       invalid access to packet, off=74 size=1, R2(id=1898,off=74,r=0)
       R2 offset is outside of the packet
       verification time {usec} usec
       processed 17760 insns (limit 1000000) max_states_per_insn 4 total_states 630 peak_states 130 mark_read 59
       
    1: Permission denied (os error 13)
logs kept in /tmp/egt-122-{thread}

"
        )
    }

    /// Two tests refused alike (but for what changes between runs), and
    /// one that passed.
    fn two_refused() -> String {
        let first = refused("tc::b", 125, "0xff31000cfba6b310", 837553, 2000).replace(
            "logs kept in",
            "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\nlogs kept in",
        );
        let second = refused("tc::c", 151, "0xff31000cc0a2d910", 837001, 2000);
        format!(
            "running 3 tests\ntest xdp::a ... ok <1.5s>\ntest tc::b ... FAILED <2.0s>\n\
             test tc::c ... FAILED <2.1s>\n\nfailures:\n\n{first}{second}\nfailures:\n    tc::b\n    tc::c\n\n\
             test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; \
             finished in 3.50s\n"
        )
    }

    #[test]
    fn results_name_each_test() {
        let text = two_refused();
        let results = Results::parse(&text);
        assert_eq!(results.passed, ["xdp::a"]);
        assert_eq!(results.failed, ["tc::b", "tc::c"]);
        assert!(results.ran("tc::b") && !results.ran("tc::d"));
    }

    #[test]
    fn a_refused_program_is_reported_once_by_the_verifiers_verdict() {
        let text = two_refused();
        let report = Results::parse(&text).failure_report("on 6.1", Path::new("/x.log"));
        assert_eq!(report.matches("---- ").count(), 1, "{report}");
        assert!(
            report.starts_with("---- tc::b, tc::c on 6.1 ----\n"),
            "{report}"
        );
        assert!(report.contains("rejected the XDP program"), "{report}");
        assert!(report.contains("Verifier output: 0: R1=ctx"), "{report}");
        assert!(
            report.contains(
                "[... 1993 lines of the verifier's log left out; the whole output: /x.log ...]"
            ),
            "{report}"
        );
        assert!(!report.contains("       1000: "), "{report}");
        for kept in [
            "2719: (71)",
            "invalid access to packet, off=74",
            "processed 17760 insns",
            "    1: Permission denied",
            "logs kept in /tmp/egt-122-125",
        ] {
            assert!(report.contains(kept), "{kept} missing from:\n{report}");
        }
        assert!(report.lines().count() < 30, "{report}");
    }

    #[test]
    fn addresses_are_masked() {
        assert_eq!(
            mask_addresses("1: (18) r2 = 0xff31000cfba6b310 ; var_off=(0x0; 0xffff)"),
            "1: (18) r2 = 0x_ ; var_off=(0x0; 0xffff)"
        );
    }

    #[test]
    fn other_long_output_keeps_its_start_and_end() {
        let body: String = (0..200).map(|i| format!("line {i}\n")).collect();
        let text = format!("---- tc::b stdout ----\n{body}\nfailures:\n");
        let report = Results::parse(&text).failure_report("here", Path::new("/x.log"));
        assert!(report.contains("line 0\n") && report.contains("line 11\n"));
        assert!(!report.contains("line 12\n") && !report.contains("line 159\n"));
        assert!(report.contains("148 lines of output left out; the whole output: /x.log"));
        assert!(report.contains("line 160\n") && report.contains("line 199\n"));
    }
}
