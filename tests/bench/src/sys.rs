//! What the bench reads from the system: CPU time and memory of processes,
//! softirq time, conntrack counts inside a pod's namespace, BPF map memory
//! and entries, and a description of the machine.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use meshlane_tests::{Pod, Sandbox};

/// Clock ticks per second of /proc's utime/stime fields.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a whole process (all its threads, live and exited), in
/// microseconds; None when the process is gone.
pub fn process_cpu_us(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu_ticks(&stat).map(|t| t as f64 * 1e6 / clock_ticks())
}

/// utime + stime in ticks from a /proc/PID/stat line. The command name
/// (field 2) may hold spaces and parentheses, so fields count from the last ')'.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Context switches (voluntary + involuntary) of every thread of a process
/// that is alive now.
pub fn context_switches(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        total += parse_ctxt_switches(&status);
    }
    Some(total)
}

fn parse_ctxt_switches(status: &str) -> u64 {
    status
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Machine-wide softirq time in microseconds (all CPUs), from /proc/stat.
pub fn softirq_us() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_softirq_ticks(&stat).map(|t| t as f64 * 1e6 / clock_ticks())
}

fn parse_softirq_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // cpu user nice system idle iowait irq softirq ...
    line.split_whitespace().nth(7)?.parse().ok()
}

/// Resident memory of a process in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Conntrack state of one pod's network namespace.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Conntrack {
    /// nf_conntrack_count inside the namespace (0 when the module is not loaded).
    pub entries: u64,
    /// Packets dropped because the table was full or an insert failed
    /// (sum over CPUs of /proc/net/stat/nf_conntrack's drop + insert_failed).
    pub drops: u64,
}

/// Reads the pod's conntrack count and drop counters from inside its namespace.
pub fn conntrack(sb: &Sandbox, pod: &Pod) -> Result<Conntrack> {
    // One shell in the namespace reads both files; a missing file (no
    // nf_conntrack module) reads as empty.
    let out = sb.netns_exec(
        &pod.netns,
        "sh",
        &[
            "-c",
            "cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null; echo ---; \
             cat /proc/net/stat/nf_conntrack 2>/dev/null; true",
        ],
        None,
    )?;
    let (count, stats) = out
        .split_once("---")
        .with_context(|| format!("conntrack read in {} printed {out:?}", pod.netns))?;
    let entries = match count.trim() {
        "" => 0,
        s => s
            .parse()
            .with_context(|| format!("nf_conntrack_count in {} is {s:?}", pod.netns))?,
    };
    Ok(Conntrack {
        entries,
        drops: parse_conntrack_drops(stats),
    })
}

/// Sums the drop and insert_failed columns (hex, one row per CPU).
fn parse_conntrack_drops(stats: &str) -> u64 {
    let mut lines = stats.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return 0;
    };
    let cols: Vec<&str> = header.split_whitespace().collect();
    let wanted: Vec<usize> = cols
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(**c, "drop" | "insert_failed"))
        .map(|(i, _)| i)
        .collect();
    lines
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            wanted
                .iter()
                .filter_map(|&i| u64::from_str_radix(f.get(i)?, 16).ok())
                .sum::<u64>()
        })
        .sum()
}

/// One pinned BPF map.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapUsage {
    pub kind: String,
    /// The kernel's memory accounting for the map (fdinfo memlock).
    pub bytes: u64,
    /// Entries found by iterating the map; None for types that cannot be
    /// iterated from user space (socket storage lives on the sockets).
    pub entries: Option<u64>,
}

/// Every map pinned under `<bpffs>/maps`, by pin name.
pub fn bpf_maps(bpffs: &Path) -> Result<BTreeMap<String, MapUsage>> {
    let dir = bpffs.join("maps");
    let mut out = BTreeMap::new();
    let rd = std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let show = bpftool(&["map", "show", "pinned", &path.to_string_lossy()])?;
        let kind = show["type"].as_str().unwrap_or("?").to_string();
        let bytes = show["bytes_memlock"].as_u64().unwrap_or(0);
        let entries = bpftool(&["map", "dump", "pinned", &path.to_string_lossy()])
            .ok()
            .and_then(|v| v.as_array().map(|a| a.len() as u64));
        out.insert(
            name,
            MapUsage {
                kind,
                bytes,
                entries,
            },
        );
    }
    Ok(out)
}

fn bpftool(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .with_context(|| format!("running bpftool -j {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "bpftool -j {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing the JSON of bpftool -j {}", args.join(" ")))
}

/// Turns on the kernel's run-time accounting of BPF programs for as long as
/// the returned descriptor is open (BPF_ENABLE_STATS; closing it turns the
/// accounting off again unless someone else holds it too).
pub fn enable_bpf_stats() -> Result<std::os::fd::OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr: enable_stats.type = BPF_STATS_RUN_TIME (0), rest zero.
    let attr = [0u8; 64];
    // SAFETY: bpf(2) reads `attr` of the given size; the result is a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        bail!("bpf(BPF_ENABLE_STATS): {}", std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Run count and total run time (ns) of every program pinned under
/// `<bpffs>/progs`, by pin name (zero unless stats are enabled).
pub fn bpf_prog_stats(bpffs: &Path) -> Result<BTreeMap<String, (u64, u64)>> {
    let dir = bpffs.join("progs");
    let mut out = BTreeMap::new();
    let rd = std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
    for e in rd.flatten() {
        let v = bpftool(&["prog", "show", "pinned", &e.path().to_string_lossy()])?;
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            (
                v["run_cnt"].as_u64().unwrap_or(0),
                v["run_time_ns"].as_u64().unwrap_or(0),
            ),
        );
    }
    Ok(out)
}

/// The machine the numbers came from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub nf_conntrack_max: Option<u64>,
    /// 1-minute load average when the run started and when it ended: other
    /// work on the machine shows up here.
    pub load_start: f64,
    pub load_end: f64,
    pub git_commit: Option<String>,
    /// How idle CPUs waited for work during the run (see [`IdleHold`]).
    #[serde(default)]
    pub cpu_idle: String,
}

pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

pub fn machine(root: &Path) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_kb: f64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    let git_commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    Machine {
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: (mem_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        nf_conntrack_max: read("/proc/sys/net/netfilter/nf_conntrack_max")
            .trim()
            .parse()
            .ok(),
        load_start: loadavg(),
        load_end: 0.0,
        git_commit,
        cpu_idle: String::new(),
    }
}

/// The cpuidle driver and governor, for the run's description.
fn cpuidle_setup() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(format!("/sys/devices/system/cpu/cpuidle/{p}"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    format!(
        "cpuidle driver {}, governor {}",
        read("current_driver"),
        read("current_governor_ro")
    )
}

/// Keeps idle CPUs polling for the life of the value: a PM QoS request of 0 µs
/// wake-up latency on `/dev/cpu_dma_latency`, the same request tuned's
/// latency-performance profile makes. On a virtual machine an idle vCPU
/// otherwise halts, and waking it costs an exit to the host and back, tens
/// of microseconds that every hop of every mode pays alike and that hide what
/// the modes do differently. The kernel drops the request when the file is
/// closed, so nothing outlives the run (even if it is killed).
pub struct IdleHold {
    _file: Option<std::fs::File>,
    /// For the results: what was held, or why not.
    pub description: String,
}

impl IdleHold {
    pub fn new(hold: bool) -> IdleHold {
        let setup = cpuidle_setup();
        if !hold {
            return IdleHold {
                _file: None,
                description: format!("as the machine has it ({setup}; --cpu-idle os)"),
            };
        }
        let held = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")
            .and_then(|mut f| {
                use std::io::Write;
                f.write_all(&0i32.to_ne_bytes())?;
                Ok(f)
            });
        match held {
            Ok(f) => IdleHold {
                _file: Some(f),
                description: format!(
                    "idle CPUs poll for work (/dev/cpu_dma_latency held at 0 µs; {setup})"
                ),
            },
            Err(e) => IdleHold {
                _file: None,
                description: format!(
                    "as the machine has it ({setup}): holding /dev/cpu_dma_latency at 0 \
                     failed: {e}"
                ),
            },
        }
    }
}

/// Raises this process's open-file limits (soft and hard, as far as
/// fs.nr_open allows) so the processes it starts inherit room for tens of
/// thousands of sockets.
pub fn raise_nofile(want: u64) -> Result<u64> {
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let target = want.min(nr_open);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!(
                "getrlimit(RLIMIT_NOFILE): {}",
                std::io::Error::last_os_error()
            );
        }
        if lim.rlim_cur >= target {
            return Ok(lim.rlim_cur);
        }
        // Only root may raise the hard limit; others go as far as it allows.
        let new = libc::rlimit {
            rlim_cur: target.max(lim.rlim_cur),
            rlim_max: target.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &new) == 0 {
            return Ok(new.rlim_cur);
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!(
                "setrlimit(RLIMIT_NOFILE): {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(lim.rlim_cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_tricky_command_name() {
        // comm with a space and a ')' inside; utime 150, stime 50.
        let line = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 150 50 0 0 20 0 3 0 1000 1000000 200";
        assert_eq!(parse_stat_cpu_ticks(line), Some(200));
    }

    #[test]
    fn ctxt_switch_lines() {
        let st = "Name:\tx\nvoluntary_ctxt_switches:\t10\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(parse_ctxt_switches(st), 13);
    }

    #[test]
    fn softirq_column() {
        let stat = "cpu  10 0 20 3000 5 1 77 0 0 0\ncpu0 5 0 10 1500 2 0 40 0 0 0\n";
        assert_eq!(parse_softirq_ticks(stat), Some(77));
    }

    #[test]
    fn conntrack_drop_columns_are_hex_and_summed() {
        let s = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop\n\
                 0000000a 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000001 00000010 00000000\n\
                 0000000a 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000002 00000000\n";
        assert_eq!(parse_conntrack_drops(s), 1 + 16 + 2);
        assert_eq!(parse_conntrack_drops(""), 0);
    }

    #[test]
    fn own_process_is_measurable() {
        let me = std::process::id();
        assert!(process_cpu_us(me).is_some());
        assert!(rss_bytes(me).unwrap() > 0);
    }
}
