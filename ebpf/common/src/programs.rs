//! Every kernel program of the object, once: its name (the function name in
//! `ebpf/programs`, which is also its name in the object and its pin), the
//! hook it runs at, where it is attached, and the first Linux release that
//! has that hook. The agent attaches, pins and adopts by walking [`ALL`];
//! `meshlane probe` and `meshlane status` name programs and hooks from it;
//! `agent/tests/shape.rs` fails if the built object disagrees.

/// The kernel hook a program runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// `BPF_PROG_TYPE_CGROUP_SOCK`, `BPF_CGROUP_INET4_POST_BIND`.
    PostBind4,
    /// `BPF_PROG_TYPE_CGROUP_SOCK`, `BPF_CGROUP_INET6_POST_BIND`.
    PostBind6,
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`, `BPF_CGROUP_INET4_CONNECT`.
    Connect4,
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`, `BPF_CGROUP_INET6_CONNECT`.
    Connect6,
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`, `BPF_CGROUP_UDP4_SENDMSG`.
    SendMsg4,
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`, `BPF_CGROUP_UDP6_SENDMSG`.
    SendMsg6,
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`, `BPF_CGROUP_UDP4_RECVMSG`.
    RecvMsg4,
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`, `BPF_CGROUP_UDP6_RECVMSG`.
    RecvMsg6,
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`, `BPF_CGROUP_INET4_GETPEERNAME`.
    GetPeerName4,
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`, `BPF_CGROUP_INET6_GETPEERNAME`.
    GetPeerName6,
    /// `BPF_PROG_TYPE_CGROUP_SOCKOPT`, `BPF_CGROUP_GETSOCKOPT`.
    GetSockopt,
    /// `BPF_PROG_TYPE_SOCK_OPS`, `BPF_CGROUP_SOCK_OPS`.
    SockOps,
    /// `BPF_PROG_TYPE_SK_LOOKUP`, `BPF_SK_LOOKUP`.
    SkLookup,
    /// `BPF_PROG_TYPE_SK_MSG`, `BPF_SK_MSG_VERDICT`.
    SkMsg,
}

impl Hook {
    /// The hook as people name it (and as the object's ELF section says).
    pub const fn section(self) -> &'static str {
        match self {
            Hook::PostBind4 => "cgroup/post_bind4",
            Hook::PostBind6 => "cgroup/post_bind6",
            Hook::Connect4 => "cgroup/connect4",
            Hook::Connect6 => "cgroup/connect6",
            Hook::SendMsg4 => "cgroup/sendmsg4",
            Hook::SendMsg6 => "cgroup/sendmsg6",
            Hook::RecvMsg4 => "cgroup/recvmsg4",
            Hook::RecvMsg6 => "cgroup/recvmsg6",
            Hook::GetPeerName4 => "cgroup/getpeername4",
            Hook::GetPeerName6 => "cgroup/getpeername6",
            Hook::GetSockopt => "cgroup/getsockopt",
            Hook::SockOps => "sockops",
            Hook::SkLookup => "sk_lookup",
            Hook::SkMsg => "sk_msg",
        }
    }

    /// First Linux release with this program type and attach type (the
    /// commit that added it in a comment).
    pub const fn min_kernel(self) -> &'static str {
        match self {
            // d74bad4e74ee "bpf: Hooks for sys_connect", aac3fc320d94
            // "bpf: post-hooks for sys_bind"
            Hook::Connect4 | Hook::Connect6 | Hook::PostBind4 | Hook::PostBind6 => "4.17",
            // 1cedee13d25a "bpf: Hooks for sys_sendmsg"
            Hook::SendMsg4 | Hook::SendMsg6 => "4.18",
            // 983695fa6765 "bpf: fix unconnected udp hooks"
            Hook::RecvMsg4 | Hook::RecvMsg6 => "5.2",
            // 1b66d253610c "bpf: Add get{peer,sock}name attach types for sock_addr"
            Hook::GetPeerName4 | Hook::GetPeerName6 => "5.8",
            // 0d01da6afc54 "bpf: implement getsockopt and setsockopt hooks"
            Hook::GetSockopt => "5.3",
            // 40304b2a1567 "bpf: BPF support for sock_ops"
            Hook::SockOps => "4.13",
            // e9ddbb7707ff "bpf: Introduce SK_LOOKUP program type with a dedicated attach point"
            Hook::SkLookup => "5.9",
            // 4f738adba30a "bpf: create tcp_bpf_ulp allowing BPF to monitor socket TX/RX data"
            Hook::SkMsg => "4.17",
        }
    }

    /// The kernel's program type of this hook.
    pub const fn prog_type(self) -> ProgType {
        match self {
            Hook::PostBind4 | Hook::PostBind6 => ProgType::Sock,
            Hook::Connect4
            | Hook::Connect6
            | Hook::SendMsg4
            | Hook::SendMsg6
            | Hook::RecvMsg4
            | Hook::RecvMsg6
            | Hook::GetPeerName4
            | Hook::GetPeerName6 => ProgType::SockAddr,
            Hook::GetSockopt => ProgType::Sockopt,
            Hook::SockOps => ProgType::SockOps,
            Hook::SkLookup => ProgType::SkLookup,
            Hook::SkMsg => ProgType::SkMsg,
        }
    }

    /// Where a program of this hook is attached.
    pub const fn target(self) -> Target {
        match self {
            Hook::SkLookup => Target::PodNetns,
            Hook::SkMsg => Target::Map(crate::maps::SOCKS.name),
            _ => Target::Cgroup,
        }
    }
}

/// A program type of the kernel (`BPF_PROG_TYPE_*`) meshlane uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgType {
    /// `BPF_PROG_TYPE_CGROUP_SOCK`: post_bind.
    Sock,
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`: connect, sendmsg, recvmsg, getpeername.
    SockAddr,
    /// `BPF_PROG_TYPE_CGROUP_SOCKOPT`.
    Sockopt,
    /// `BPF_PROG_TYPE_SOCK_OPS`.
    SockOps,
    /// `BPF_PROG_TYPE_SK_LOOKUP`.
    SkLookup,
    /// `BPF_PROG_TYPE_SK_MSG`.
    SkMsg,
}

/// What a program is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The agent's cgroup (every pod's processes below it), one pinned link.
    Cgroup,
    /// Each captured pod's network namespace, one pinned link per pod.
    PodNetns,
    /// A sockhash map (the program lives as long as the map).
    Map(&'static str),
}

/// One kernel program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program {
    /// Function name in `ebpf/programs`, name in the object and pin name.
    pub name: &'static str,
    pub hook: Hook,
    /// What it does, for `meshlane status` and the docs.
    pub does: &'static str,
}

impl Program {
    /// How status shows where it is attached.
    pub const fn attached_to(&self) -> &'static str {
        match self.hook.target() {
            Target::Cgroup => self.hook.section(),
            Target::PodNetns => "sk_lookup (per pod netns)",
            Target::Map(_) => "sk_msg (SOCKS sockhash)",
        }
    }
}

pub const REDIRECT_CONNECT4: Program = Program {
    name: "redirect_connect4",
    hook: Hook::Connect4,
    does: "sends a meshed pod's TCP connect() to its proxy (the decision table)",
};
pub const RECORD_BIND4: Program = Program {
    name: "record_bind4",
    hook: Hook::PostBind4,
    does: "records the uid that bound a socket to a capture port: only the proxy's listeners are used for capture",
};
pub const RECORD_BIND6: Program = Program {
    name: "record_bind6",
    hook: Hook::PostBind6,
    does: "the same for AF_INET6 sockets",
};
pub const RESTORE_PEERNAME4: Program = Program {
    name: "restore_peername4",
    hook: Hook::GetPeerName4,
    does: "makes getpeername() of a redirected socket answer the original destination",
};
pub const REDIRECT_CONNECT6: Program = Program {
    name: "redirect_connect6",
    hook: Hook::Connect6,
    does: "the same for AF_INET6 sockets: IPv4-mapped destinations as IPv4, native IPv6 as Istio's ip6tables",
};
pub const REDIRECT_SENDMSG4: Program = Program {
    name: "redirect_sendmsg4",
    hook: Hook::SendMsg4,
    does: "sends a meshed pod's unconnected UDP DNS query to the DNS proxy",
};
pub const REDIRECT_SENDMSG6: Program = Program {
    name: "redirect_sendmsg6",
    hook: Hook::SendMsg6,
    does: "the same for AF_INET6 UDP sockets",
};
pub const RESTORE_RECVMSG4: Program = Program {
    name: "restore_recvmsg4",
    hook: Hook::RecvMsg4,
    does: "makes a DNS proxy's reply come from the server the app asked",
};
pub const RESTORE_RECVMSG6: Program = Program {
    name: "restore_recvmsg6",
    hook: Hook::RecvMsg6,
    does: "the same for AF_INET6 UDP sockets",
};
pub const RESTORE_PEERNAME6: Program = Program {
    name: "restore_peername6",
    hook: Hook::GetPeerName6,
    does: "getpeername() of a redirected AF_INET6 socket answers the original destination",
};
pub const ORIGINAL_DST: Program = Program {
    name: "original_dst",
    hook: Hook::GetSockopt,
    does: "answers getsockopt(SO_ORIGINAL_DST) for the proxy's accepted sockets",
};
pub const TRACK_REDIRECTED: Program = Program {
    name: "track_redirected",
    hook: Hook::SockOps,
    does:
        "hands original destinations to the proxy's side, registers listeners, joins the shortcut",
};
pub const CAPTURE_INBOUND: Program = Program {
    name: "capture_inbound",
    hook: Hook::SkLookup,
    does: "hands connections to a pod's addresses to its proxy's inbound listener",
};
pub const SHORTCUT_SEND: Program = Program {
    name: "shortcut_send",
    hook: Hook::SkMsg,
    does: "delivers bytes between meshed sockets of this node straight into the peer socket",
};

/// Every program, in attach order: consumers of recorded state (getsockopt,
/// getpeername, sockops) before the connect hook that records it, so a
/// redirected connection always finds its reader attached.
pub const ALL: &[Program] = &[
    RECORD_BIND4,
    RECORD_BIND6,
    RESTORE_PEERNAME4,
    RESTORE_PEERNAME6,
    RESTORE_RECVMSG4,
    RESTORE_RECVMSG6,
    ORIGINAL_DST,
    TRACK_REDIRECTED,
    REDIRECT_CONNECT4,
    REDIRECT_CONNECT6,
    REDIRECT_SENDMSG4,
    REDIRECT_SENDMSG6,
    CAPTURE_INBOUND,
    SHORTCUT_SEND,
];

/// The row of program `name`.
pub fn by_name(name: &str) -> Option<&'static Program> {
    ALL.iter().find(|p| p.name.as_bytes() == name.as_bytes())
}

crate::assert_unique_names!(ALL);
