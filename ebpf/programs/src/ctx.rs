//! Reading program contexts, once for every program.

/// Address family numbers of `struct sock_common` and the contexts.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
/// `IPPROTO_TCP`, as sk_lookup reports a lookup's protocol.
pub const IPPROTO_TCP: u32 = 6;

/// Reads one field of a context pointer with a single load of its own size:
/// the verifier rejects the wider loads the compiler would merge neighbouring
/// fields into, and a context field must be read in one access.
macro_rules! field {
    ($ctx:expr, $($f:tt)+) => {
        unsafe { core::ptr::read_volatile(&raw const (*$ctx).$($f)+) }
    };
}

/// Writes one field of a context pointer with a single store.
macro_rules! set_field {
    ($ctx:expr, $f:ident $([$i:expr])?, $v:expr) => {
        unsafe { core::ptr::write_volatile(&raw mut (*$ctx).$f $([$i])?, $v) }
    };
}

/// Reads an IPv6 address field (`[u32; 4]`) of a context pointer, one
/// 4-byte load per word.
macro_rules! v6_field {
    ($ctx:expr, $f:ident) => {
        meshlane_common::V6([
            $crate::ctx::field!($ctx, $f[0]),
            $crate::ctx::field!($ctx, $f[1]),
            $crate::ctx::field!($ctx, $f[2]),
            $crate::ctx::field!($ctx, $f[3]),
        ])
    };
}

/// Writes an IPv6 address field of a context pointer, one 4-byte store per
/// word.
macro_rules! set_v6_field {
    ($ctx:expr, $f:ident, $v:expr) => {{
        let v: meshlane_common::V6 = $v;
        $crate::ctx::set_field!($ctx, $f[0], v.0[0]);
        $crate::ctx::set_field!($ctx, $f[1], v.0[1]);
        $crate::ctx::set_field!($ctx, $f[2], v.0[2]);
        $crate::ctx::set_field!($ctx, $f[3], v.0[3]);
    }};
}

pub(crate) use field;
pub(crate) use set_field;
pub(crate) use set_v6_field;
pub(crate) use v6_field;
