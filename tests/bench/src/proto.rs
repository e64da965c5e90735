//! The load generator's wire format: one 8-byte header at the start of each
//! connection, `"MB"`, a kind byte, a zero byte and a little-endian u32.
//!
//! * `Echo(size)`: every request is `size` bytes (the first one begins with
//!   the header) and the server answers each with the same `size` bytes.
//! * `Sink`: the client streams bytes until it shuts down its write side;
//!   the server then answers the total it received (u64 LE, header included)
//!   and closes, so the client knows every byte arrived.

pub const HEADER_LEN: usize = 8;
const MAGIC: [u8; 2] = *b"MB";
const KIND_ECHO: u8 = 1;
const KIND_SINK: u8 = 2;
/// Largest echo size the server accepts (it allocates one buffer of it).
pub const MAX_ECHO: u32 = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Echo(u32),
    Sink,
}

impl Kind {
    pub fn header(self) -> [u8; HEADER_LEN] {
        let (k, n) = match self {
            Kind::Echo(n) => (KIND_ECHO, n),
            Kind::Sink => (KIND_SINK, 0),
        };
        let n = n.to_le_bytes();
        [MAGIC[0], MAGIC[1], k, 0, n[0], n[1], n[2], n[3]]
    }

    pub fn parse(h: &[u8; HEADER_LEN]) -> Result<Kind, String> {
        if h[..2] != MAGIC || h[3] != 0 {
            return Err(format!("bad bench header {h:02x?}"));
        }
        let n = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        match h[2] {
            KIND_ECHO if (HEADER_LEN as u32..=MAX_ECHO).contains(&n) => Ok(Kind::Echo(n)),
            KIND_ECHO => Err(format!(
                "echo size {n} outside {HEADER_LEN}..={MAX_ECHO} bytes"
            )),
            KIND_SINK => Ok(Kind::Sink),
            k => Err(format!("unknown bench kind {k}")),
        }
    }
}

/// An echo request of `size` bytes (at least the header) carrying the header.
pub fn echo_request(size: u32) -> Vec<u8> {
    let size = size.max(HEADER_LEN as u32);
    let mut v = vec![0x5a; size as usize];
    v[..HEADER_LEN].copy_from_slice(&Kind::Echo(size).header());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        for k in [Kind::Echo(64), Kind::Echo(16 * 1024), Kind::Sink] {
            assert_eq!(Kind::parse(&k.header()), Ok(k));
        }
    }

    #[test]
    fn bad_headers_are_named() {
        assert!(Kind::parse(b"GET / HT")
            .unwrap_err()
            .contains("bad bench header"));
        let mut h = Kind::Echo(64).header();
        h[4..].copy_from_slice(&(MAX_ECHO + 1).to_le_bytes());
        assert!(Kind::parse(&h).unwrap_err().contains("outside"));
        let mut h = Kind::Sink.header();
        h[2] = 9;
        assert_eq!(Kind::parse(&h), Err("unknown bench kind 9".into()));
    }

    #[test]
    fn echo_request_is_sized() {
        let r = echo_request(64);
        assert_eq!(r.len(), 64);
        assert_eq!(Kind::parse(r[..8].try_into().unwrap()), Ok(Kind::Echo(64)));
        assert_eq!(echo_request(1).len(), HEADER_LEN);
    }
}
