//! Running a row: the runner script, qemu with the initramfs (or the host
//! itself for a native row), and the console streamed as it comes.
use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{
    initramfs::build_initramfs,
    kernel::Image,
    results::{collect, Row},
    Opts, TestBin, FIRST,
};
use crate::root;

/// The script the guest runs (inside the chroot, i.e. on the host's own
/// userland), or the host runs for a native row. Every output goes to the
/// results directory and to the console.
fn runner_script(bins: &[TestBin], meshlane: &Path, opts: &Opts, results: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "#!/bin/sh");
    let _ = writeln!(s, "set -u");
    let _ = writeln!(s, "R={results}");
    let _ = writeln!(
        s,
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1 RUST_LIB_BACKTRACE=0"
    );
    let _ = writeln!(s, "ip link set lo up 2>/dev/null");
    let _ = writeln!(s, "uname -r > $R/uname");
    let _ = writeln!(s, "echo '== meshlane probe'");
    let _ = writeln!(
        s,
        "{{ {} probe; echo $? > $R/probe.rc; }} 2>&1 | tee $R/probe.out",
        shell_quote(&meshlane.to_string_lossy())
    );
    let filter = opts
        .filter
        .as_deref()
        .map(|f| format!(" {}", shell_quote(f)))
        .unwrap_or_default();
    let tests_dir = root().join("tests");
    for b in bins {
        let threads = if b.name == FIRST {
            1
        } else {
            opts.test_threads
        };
        let _ = writeln!(s, "echo '== {}'", b.name);
        let _ = writeln!(
            s,
            "{{ cd {} && {} --test-threads={threads} --show-output{filter}; echo $? > $R/{}.rc; }} 2>&1 | tee $R/{}.out",
            shell_quote(&tests_dir.to_string_lossy()),
            shell_quote(&b.path.to_string_lossy()),
            b.name,
            b.name
        );
    }
    let _ = writeln!(s, "echo finished > $R/done");
    s
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn fresh_results(work: &Path, row: &str) -> Result<PathBuf> {
    let dir = work.join("runs").join(row);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("results"))?;
    Ok(dir)
}

fn row_key(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(super) fn run_in_vm(
    img: &Image,
    bins: &[TestBin],
    meshlane: &Path,
    opts: &Opts,
    work: &Path,
) -> Result<Row> {
    let initramfs = build_initramfs(img, work)?;
    let dir = fresh_results(work, &row_key(&img.release))?;
    let results = dir.join("results");
    let script = dir.join("guest.sh");
    fs::write(
        &script,
        runner_script(bins, meshlane, opts, "/run/vm-results"),
    )?;
    let console_path = dir.join("console.log");
    let mut console = fs::File::create(&console_path)?;
    let append = format!(
        "console=ttyS0 rdinit=/init panic=-1 oops=panic quiet loglevel=4 mitigations=off meshlane.runner={}",
        script.display()
    );
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "3G",
        ])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&img.vmlinuz)
        .arg("-initrd")
        .arg(&initramfs)
        .arg("-append")
        .arg(&append)
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=results,security_model=none,multidevs=remap",
            results.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (cargo xtask setup installs qemu-system-x86)")?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(opts.timeout_min * 60);
    let mut line = Vec::new();
    let mut timed_out = false;
    let prefix = format!("[{}] ", img.release);
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(chunk) => {
                console.write_all(&chunk)?;
                for b in chunk {
                    if b == b'\n' {
                        let text = strip_ansi(&String::from_utf8_lossy(&line));
                        if !text.trim().is_empty() {
                            println!("{prefix}{}", text.trim_end());
                        }
                        line.clear();
                    } else {
                        line.push(b);
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            break;
        }
    }
    let status = child.wait()?;
    let qemu_err = err_thread.join().unwrap_or_default();
    let mut row = collect(
        &img.label,
        &img.release,
        "qemu",
        bins,
        &results,
        opts.filter.is_some(),
    )?;
    if timed_out {
        row.broken = Some(format!(
            "timed out after {} min (--timeout-min); console: {}",
            opts.timeout_min,
            console_path.display()
        ));
    } else if !results.join("done").is_file() {
        row.broken = Some(format!(
            "the guest stopped before the runner finished (qemu {status}{}); console: {}",
            if qemu_err.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", qemu_err.trim())
            },
            console_path.display()
        ));
    }
    Ok(row)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

pub(super) fn run_native(
    release: &str,
    why: &str,
    bins: &[TestBin],
    meshlane: &Path,
    opts: &Opts,
    work: &Path,
) -> Result<Row> {
    let dir = fresh_results(work, &format!("native-{}", row_key(release)))?;
    let results = dir.join("results");
    let script = dir.join("native.sh");
    fs::write(
        &script,
        runner_script(bins, meshlane, opts, &results.to_string_lossy()),
    )?;
    let mut child = Command::new("timeout")
        .arg(format!("{}m", opts.timeout_min))
        .arg("/bin/sh")
        .arg(&script)
        .stdout(Stdio::piped())
        .spawn()
        .context("running the native row")?;
    let prefix = format!("[{release} native] ");
    for l in BufReader::new(child.stdout.take().expect("piped")).lines() {
        println!("{prefix}{}", l?);
    }
    let status = child.wait()?;
    let mut row = collect(
        &format!("host {release}"),
        release,
        "native",
        bins,
        &results,
        opts.filter.is_some(),
    )?;
    row.note = Some(why.to_string());
    if !results.join("done").is_file() {
        row.broken = Some(format!("the native runner stopped early ({status})"));
    }
    Ok(row)
}
