//! Field offsets of kernel structures, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`). The shortcut's backpressure reads two kernel
//! fields that no BPF context exposes; their offsets differ between kernels
//! and builds, so they are looked up here and handed to the program through
//! `SETTINGS` instead of being compiled in.
//!
//! The format (Documentation/bpf/btf.rst): a header, a type section of
//! `btf_type` records each followed by kind-specific data, and a string
//! section. Only what finding a struct member needs is parsed.
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// Bytes of kind-specific data after a 12-byte `btf_type` of `kind` with
/// `vlen` entries.
fn trailing(kind: u32, vlen: usize) -> Result<usize> {
    Ok(match kind {
        // INT: one u32 of encoding.
        1 => 4,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
        2 | 7..=12 | 16 | 18 => 0,
        // ARRAY: type, index type, count.
        3 => 12,
        // STRUCT, UNION: name, type, offset per member. DATASEC: type,
        // offset, size per variable. ENUM64: name, low, high per value.
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM: name, value. FUNC_PROTO: name, type per parameter.
        6 | 13 => 8 * vlen,
        // VAR: linkage. DECL_TAG: component index.
        14 | 17 => 4,
        other => bail!("unknown BTF kind {other}"),
    })
}

/// A BTF blob: types and strings.
pub struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    let bytes = b
        .get(at..at + 4)
        .with_context(|| format!("BTF truncated at byte {at}"))?;
    Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
}

impl<'a> Btf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self> {
        ensure!(data.len() >= 24, "BTF too short: {} bytes", data.len());
        let magic = u16::from_le_bytes([data[0], data[1]]);
        ensure!(
            magic == MAGIC,
            "not little-endian BTF: magic {magic:#06x}, expected {MAGIC:#06x}"
        );
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize, what: &str| {
            data.get(hdr_len + off..hdr_len + off + len)
                .with_context(|| format!("BTF {what} section out of bounds"))
        };
        Ok(Self {
            types: section(type_off, type_len, "type")?,
            strings: section(str_off, str_len, "string")?,
        })
    }

    fn name(&self, off: u32) -> &'a [u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    /// Byte offset of `member` in the struct named `strukt` (the first such
    /// struct that has the member). Bitfields are refused.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32> {
        let mut at = 0;
        while at < self.types.len() {
            let name_off = u32_at(self.types, at)?;
            let info = u32_at(self.types, at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let vlen = (info & 0xffff) as usize;
            let body = at + 12;
            at = body + trailing(kind, vlen)?;
            if kind != KIND_STRUCT || self.name(name_off) != strukt.as_bytes() {
                continue;
            }
            for i in 0..vlen {
                let m = body + 12 * i;
                if self.name(u32_at(self.types, m)?) != member.as_bytes() {
                    continue;
                }
                let raw = u32_at(self.types, m + 8)?;
                let (bits, size) = if kind_flag {
                    (raw & 0x00ff_ffff, raw >> 24)
                } else {
                    (raw, 0)
                };
                ensure!(
                    size == 0 && bits % 8 == 0,
                    "struct {strukt}.{member} is a bitfield"
                );
                return Ok(bits / 8);
            }
        }
        bail!("struct {strukt} with a member {member} not found in the kernel's BTF")
    }
}

/// True when the running kernel tells sk_lookup programs the interface a
/// packet arrived on (`struct bpf_sk_lookup.ingress_ifindex`, Linux 5.17).
pub fn sk_lookup_has_ingress_ifindex() -> bool {
    std::fs::read(VMLINUX).is_ok_and(|d| {
        Btf::parse(&d).is_ok_and(|b| b.member_offset("bpf_sk_lookup", "ingress_ifindex").is_ok())
    })
}

/// Where the shortcut finds a peer's queued bytes, on the running kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PsockOffsets {
    /// `struct sock.sk_user_data`, which points at the socket's psock.
    pub sk_user_data: u32,
    /// `struct sk_psock.msg_tot_len`: bytes on the ingress list, unread.
    pub msg_tot_len: u32,
}

impl PsockOffsets {
    pub fn from_btf(btf: &Btf) -> Result<Self> {
        Ok(Self {
            sk_user_data: btf.member_offset("sock", "sk_user_data")?,
            msg_tot_len: btf.member_offset("sk_psock", "msg_tot_len")?,
        })
    }

    /// From the running kernel. The error says what is missing: without
    /// these the shortcut cannot bound what a sender queues on its peer.
    pub fn of_running_kernel() -> Result<Self> {
        Self::read(Path::new(VMLINUX))
    }

    pub fn read(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).with_context(|| {
            format!(
                "reading the kernel's BTF at {} (CONFIG_DEBUG_INFO_BTF)",
                path.display()
            )
        })?;
        let btf = Btf::parse(&data).with_context(|| format!("parsing {}", path.display()))?;
        Self::from_btf(&btf).context(
            "the shortcut needs to see how many bytes a peer socket has queued unread \
             (struct sk_psock.msg_tot_len, Linux 6.8 or newer) to push back on a sender \
             whose reader lags",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob: an INT, a PTR, a STRUCT with the given members
    /// (name, bit offset), an ENUM with two values, and a kind_flag STRUCT
    /// with a bitfield.
    fn blob(strukt: &str, members: &[(&str, u32)]) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut add = |s: &str| {
            let off = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let mut types = Vec::new();
        let mut push = |v: &[u32]| v.iter().for_each(|x| types.extend(x.to_le_bytes()));
        let int = add("int");
        push(&[int, 1 << 24, 4, 32]);
        push(&[0, 2 << 24, 1]);
        let e = add("colour");
        let (red, blue) = (add("red"), add("blue"));
        push(&[e, (6 << 24) | 2, 4, red, 0, blue, 1]);
        let bf = add("flags");
        let f = add("f");
        push(&[bf, (1 << 31) | (4 << 24) | 1, 4, f, 1, (3 << 24) | 5]);
        let s = add(strukt);
        let names: Vec<u32> = members.iter().map(|(n, _)| add(n)).collect();
        push(&[s, (4 << 24) | members.len() as u32, 64]);
        for (n, (_, bits)) in names.iter().zip(members) {
            push(&[*n, 1, *bits]);
        }
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(v.to_le_bytes());
        }
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn finds_member_offsets_after_other_kinds() {
        let data = blob(
            "sk_psock",
            &[("sk", 0), ("ingress_msg", 64), ("msg_tot_len", 416)],
        );
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.member_offset("sk_psock", "msg_tot_len").unwrap(), 52);
        assert_eq!(btf.member_offset("sk_psock", "sk").unwrap(), 0);
    }

    #[test]
    fn names_what_is_missing() {
        let data = blob("sk_psock", &[("sk", 0)]);
        let btf = Btf::parse(&data).unwrap();
        let e = btf.member_offset("sk_psock", "msg_tot_len").unwrap_err();
        assert_eq!(
            e.to_string(),
            "struct sk_psock with a member msg_tot_len not found in the kernel's BTF"
        );
        let e = btf.member_offset("flags", "f").unwrap_err();
        assert_eq!(e.to_string(), "struct flags.f is a bitfield");
    }

    #[test]
    fn refuses_what_is_not_btf() {
        let e = Btf::parse(&[0u8; 30]).err().unwrap();
        assert!(e.to_string().contains("magic 0x0000"), "{e}");
        let mut data = blob("x", &[]);
        data.truncate(30);
        let e = Btf::parse(&data).err().unwrap();
        assert!(e.to_string().contains("out of bounds"), "{e}");
    }

    /// bpftool's own reading of a member's bit offset, to check ours against.
    fn bpftool_bits(strukt: &str, member: &str) -> Option<u32> {
        let out = std::process::Command::new("bpftool")
            .args(["btf", "dump", "file", VMLINUX])
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        let head = format!("STRUCT '{strukt}' ");
        let want = format!("'{member}' ");
        let lines = text.lines().skip_while(|l| !l.contains(&head)).skip(1);
        lines
            .take_while(|l| l.starts_with('\t'))
            .find(|l| l.trim_start().starts_with(&want))?
            .split("bits_offset=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// The running kernel's offsets, as bpftool reads them.
    #[test]
    fn running_kernel_agrees_with_bpftool() {
        if !Path::new(VMLINUX).exists() {
            eprintln!("SKIPPED: {VMLINUX} absent: this kernel has no BTF");
            return;
        }
        let Some(user_data_bits) = bpftool_bits("sock", "sk_user_data") else {
            eprintln!("SKIPPED: bpftool is not installed or cannot read {VMLINUX}");
            return;
        };
        match bpftool_bits("sk_psock", "msg_tot_len") {
            Some(bits) => {
                let o = PsockOffsets::of_running_kernel().unwrap();
                assert_eq!(o.sk_user_data * 8, user_data_bits);
                assert_eq!(o.msg_tot_len * 8, bits);
            }
            None => {
                let e = PsockOffsets::of_running_kernel().unwrap_err();
                assert!(format!("{e:#}").contains("msg_tot_len"), "{e:#}");
            }
        }
    }
}
