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

pub(crate) use field;
pub(crate) use set_field;
