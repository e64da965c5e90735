//! Results: each binary's libtest output read back into per-test outcomes,
//! a row's verdict, and the matrix across kernels.
use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use anyhow::Result;

use super::TestBin;

/// The marker a start-up refusal carries (agent/src/probe.rs).
const REFUSAL_MARK: &str = "meshlane cannot run on this kernel";

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Pass,
    Fail(String),
    Skipped(String),
    /// Failed because the agent refused this kernel at start-up.
    Refused,
}

impl Outcome {
    fn short(&self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail(_) => "FAIL",
            Outcome::Skipped(_) => "skipped",
            Outcome::Refused => "refused",
        }
    }
}

pub(super) struct Row {
    pub(super) label: String,
    pub(super) release: String,
    pub(super) how: String,
    pub(super) probe: String,
    pub(super) refused: Option<String>,
    pub(super) tests: Vec<(String, Outcome)>,
    pub(super) broken: Option<String>,
    pub(super) note: Option<String>,
    pub(super) seconds: u64,
}

impl Row {
    pub(super) fn broken(label: &str, why: String) -> Row {
        Row {
            label: label.to_string(),
            release: String::new(),
            how: String::new(),
            probe: String::new(),
            refused: None,
            tests: Vec::new(),
            broken: Some(why),
            note: None,
            seconds: 0,
        }
    }

    pub(super) fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for (_, o) in &self.tests {
            match o {
                Outcome::Pass => c.0 += 1,
                Outcome::Fail(_) => c.1 += 1,
                Outcome::Skipped(_) | Outcome::Refused => c.2 += 1,
            }
        }
        c
    }

    fn verdict(&self) -> String {
        if let Some(b) = &self.broken {
            return format!("BROKEN: {b}");
        }
        let (p, f, _) = self.counts();
        let refused = self
            .tests
            .iter()
            .filter(|(_, o)| *o == Outcome::Refused)
            .count();
        let skipped = self
            .tests
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Skipped(_)))
            .count();
        let mut v = if f > 0 {
            format!("FAIL ({p} passed, {f} failed, {skipped} skipped")
        } else {
            format!("pass ({p} passed, {skipped} skipped")
        };
        if refused > 0 {
            v.push_str(&format!(", {refused} refused"));
        }
        v.push(')');
        if let Some(r) = &self.refused {
            v = format!("refused at start-up: {r} Tests: {v}");
        }
        v
    }
}

/// Reads the runner's files: the probe's output and each binary's libtest output.
pub(super) fn collect(
    label: &str,
    release: &str,
    how: &str,
    bins: &[TestBin],
    results: &Path,
    filtered: bool,
) -> Result<Row> {
    let read = |n: &str| fs::read_to_string(results.join(n)).unwrap_or_default();
    let probe = read("probe.out");
    let probe_rc = read("probe.rc").trim().to_string();
    let refused = (probe_rc != "0" && !probe_rc.is_empty()).then(|| {
        probe
            .lines()
            .find(|l| l.contains(REFUSAL_MARK))
            .unwrap_or("meshlane probe failed")
            .trim()
            .trim_start_matches("Error: ")
            .to_string()
    });
    let mut tests = Vec::new();
    for b in bins {
        let out = read(&format!("{}.out", b.name));
        let rc = read(&format!("{}.rc", b.name)).trim().to_string();
        let parsed = parse_libtest(&out);
        if parsed.is_empty() && rc == "0" && out.contains("running 0 tests") && filtered {
            // --filter matched nothing in this binary.
            continue;
        }
        if parsed.is_empty() {
            tests.push((
                format!("{}::*", b.name),
                Outcome::Fail(format!(
                    "no test ran (exit {}): {}",
                    if rc.is_empty() { "none" } else { &rc },
                    out.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
                )),
            ));
            continue;
        }
        for (name, o) in parsed {
            let o = match o {
                Outcome::Fail(msg) if refused.is_some() && msg.contains(REFUSAL_MARK) => {
                    Outcome::Refused
                }
                o => o,
            };
            tests.push((format!("{}::{name}", b.name), o));
        }
    }
    Ok(Row {
        label: label.to_string(),
        release: release.to_string(),
        how: how.to_string(),
        probe,
        refused,
        tests,
        broken: None,
        note: None,
        seconds: 0,
    })
}

/// `test NAME ... ok|FAILED|ignored[, reason]`, also when a test's own
/// output without a newline ran into the start of the line.
fn test_line(line: &str) -> Option<(String, Outcome)> {
    let mut from = 0;
    while let Some(pos) = line[from..].find("test ") {
        let rest = &line[from + pos + 5..];
        from += pos + 5;
        let Some((name, verdict)) = rest.split_once(" ... ") else {
            continue;
        };
        if name.is_empty() || name.contains(' ') {
            continue;
        }
        let o = match verdict.trim() {
            "ok" => Outcome::Pass,
            "FAILED" => Outcome::Fail(String::new()),
            v if v.starts_with("ignored") => Outcome::Skipped(
                v.strip_prefix("ignored, ")
                    .unwrap_or("ignored (no reason given)")
                    .to_string(),
            ),
            _ => continue,
        };
        return Some((name.to_string(), o));
    }
    None
}

/// Per test: pass, FAIL with the first lines of its panic, or skipped with
/// the reason (an `#[ignore = "…"]` reason, or a `SKIPPED: …` line the test
/// printed, which `--show-output` attributes to it).
fn parse_libtest(out: &str) -> Vec<(String, Outcome)> {
    let mut results: Vec<(String, Outcome)> = Vec::new();
    let mut sections: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    // `test NAME ... ` whose verdict a child's output pushed to a later line.
    let mut pending: Option<String> = None;
    for line in out.lines() {
        if let Some((name, o)) = test_line(line) {
            results.push((name, o));
            pending = None;
            continue;
        }
        if let Some(name) = line
            .trim_start()
            .strip_prefix("test ")
            .and_then(|r| r.split_once(" ... "))
            .map(|(n, _)| n.to_string())
            .filter(|n| !n.contains(' '))
        {
            pending = Some(name);
            continue;
        }
        if let Some(name) = &pending {
            let verdict = match line.trim() {
                "ok" => Some(Outcome::Pass),
                "FAILED" => Some(Outcome::Fail(String::new())),
                _ => None,
            };
            if let Some(o) = verdict {
                results.push((name.clone(), o));
                pending = None;
                continue;
            }
        }
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|r| r.strip_suffix(" stdout ----"))
        {
            current = Some(name.to_string());
            continue;
        }
        if line == "successes:" || line == "failures:" || line.starts_with("test result:") {
            current = None;
            continue;
        }
        if let Some(c) = &current {
            let s = sections.entry(c.clone()).or_default();
            s.push_str(line);
            s.push('\n');
        }
    }
    for (name, o) in &mut results {
        let text = sections.get(name).cloned().unwrap_or_default();
        match o {
            Outcome::Pass => {
                if let Some(reason) = text
                    .lines()
                    .find_map(|l| l.split_once("SKIPPED: ").map(|(_, r)| r.trim().to_string()))
                {
                    *o = Outcome::Skipped(reason);
                }
            }
            Outcome::Fail(msg) if text.contains(REFUSAL_MARK) => {
                // The agent refused this kernel at start-up: that line says it all.
                *msg = text
                    .lines()
                    .find(|l| l.contains(REFUSAL_MARK))
                    .unwrap_or_default()
                    .trim()
                    .to_string();
            }
            Outcome::Fail(msg) => {
                *msg = text
                    .lines()
                    .filter(|l| !l.trim().is_empty() && !l.starts_with("note:"))
                    .take(4)
                    .collect::<Vec<_>>()
                    .join(" | ");
            }
            _ => {}
        }
    }
    results
}

pub(super) fn print_row(row: &Row) {
    println!();
    println!(
        "=== kernel {} ({}) — {} in {} s",
        row.label,
        if row.how.is_empty() { "-" } else { &row.how },
        row.verdict(),
        row.seconds
    );
    if let Some(n) = &row.note {
        println!("    note: {n}");
    }
    for (name, o) in &row.tests {
        match o {
            Outcome::Pass | Outcome::Refused => println!("    {:<8} {name}", o.short()),
            Outcome::Fail(m) => println!("    {:<8} {name}: {m}", o.short()),
            Outcome::Skipped(r) => println!("    {:<8} {name}: {r}", o.short()),
        }
    }
    if !row.probe.trim().is_empty() {
        println!("    probe:");
        for l in row.probe.lines() {
            println!("      {l}");
        }
    }
}

/// Tests down, kernels across, then one line per kernel for the kernel table
/// in ebpf/README.md.
pub(super) fn matrix(rows: &[Row], started: &str) -> String {
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        for (n, _) in &r.tests {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let heads: Vec<String> = rows
        .iter()
        .map(|r| {
            if r.release.is_empty() {
                r.label.clone()
            } else {
                format!("{} ({})", r.release, r.how)
            }
        })
        .collect();
    let w = names.iter().map(String::len).max().unwrap_or(4).max(4);
    let mut s = String::new();
    let _ = writeln!(s, "\nkernel matrix, run started {started}");
    let _ = write!(s, "{:<w$}", "TEST");
    for h in &heads {
        let _ = write!(s, "  {:<28}", h);
    }
    let _ = writeln!(s);
    for n in &names {
        let _ = write!(s, "{n:<w$}");
        for r in rows {
            let cell = r
                .tests
                .iter()
                .find(|(t, _)| t == n)
                .map_or("-", |(_, o)| o.short());
            let _ = write!(s, "  {cell:<28}");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "| kernel | how | last run | result |");
    let _ = writeln!(s, "|---|---|---|---|");
    for (r, h) in rows.iter().zip(&heads) {
        let _ = writeln!(s, "| {} | {} | {started} | {} |", r.label, h, r.verdict());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_output_gives_pass_fail_and_skip_reasons() {
        let out = "\
running 4 tests
test a ... ok
    Permission denied (os error 13)test b ... FAILED
test c ... ignored, needs sk_lookup
test d ... removed 0 pinned objects
ok

successes:

---- a stdout ----
all good

---- d stdout ----
meshlane-test: SKIPPED: kernel lacks bpf_sk_assign in sk_lookup (5.9)

successes:
    a
    d

failures:

---- b stdout ----
thread 'b' panicked at tests/tests/x.rs:1:2:
landed on 9080, expected 15001

failures:
    b

test result: FAILED. 2 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out
";
        let r = parse_libtest(out);
        assert_eq!(r[0], ("a".into(), Outcome::Pass));
        assert!(matches!(&r[1].1, Outcome::Fail(m) if m.contains("expected 15001")));
        assert_eq!(r[2].1, Outcome::Skipped("needs sk_lookup".into()));
        assert_eq!(
            r[3].1,
            Outcome::Skipped("kernel lacks bpf_sk_assign in sk_lookup (5.9)".into())
        );
    }
}
