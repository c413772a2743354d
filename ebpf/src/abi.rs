//! `#[repr(C)]` mirrors of the structs in `bpf/include/weft/abi.h`, and the
//! header's constants (generated from it by build.rs). The layout test in
//! `tests/layout.rs` checks every struct here against the BTF clang emitted
//! for the C side: same size, same fields at the same offsets.

include!(concat!(env!("OUT_DIR"), "/abi_consts.rs"));

/// Declares a kernel-shared struct: `#[repr(C)]`, plain old data for aya maps,
/// and a field table the layout test compares with the C definition.
macro_rules! shared_struct {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name { $($(#[$fmeta])* pub $field: $ty,)* }

        // SAFETY: repr(C), only integer fields and arrays of them, padding explicit.
        unsafe impl aya::Pod for $name {}

        impl $name {
            /// Field names and offsets, for the layout check against the C side.
            pub fn layout() -> Vec<(&'static str, usize)> {
                vec![$((stringify!($field), std::mem::offset_of!($name, $field)),)*]
            }
        }
    };
}

shared_struct! {
    /// One verdict record from the `weft_events` ring buffer.
    pub struct Event {
        pub ts_ns: u64,
        pub r#type: u8,
        pub subtype: u8,
        pub reason: u8,
        pub flags: u8,
        pub src_ep: u16,
        pub dst_ep: u16,
        pub src_identity: u32,
        pub dst_identity: u32,
        pub ifindex: u32,
        pub saddr: u32,
        pub daddr: u32,
        pub sport: u16,
        pub dport: u16,
        pub proto: u8,
        pub tcp_flags: u8,
        pub policy_match: u8,
        pub direction: u8,
        pub orig_addr: u32,
        pub orig_port: u16,
        pub proxy_port: u16,
        pub nat_addr: u32,
        pub nat_port: u16,
        pub drop_line: u16,
        pub pkt_len: u32,
        pub rule_id: u32,
    }
}

shared_struct! {
    /// The single entry of `weft_config`.
    pub struct Config {
        pub emit_level: u32,
        pub flags: u32,
        pub netns_cookie: u64,
        pub node_ip: u32,
        pub _reserved: u32,
        pub native_cidr: u32,
        pub native_cidr_len: u8,
        /// `EP_POLICY_*`: a host policy selects this node in that direction.
        pub host_policy: u8,
        pub _pad2: u16,
        pub nat_port_min: u16,
        pub nat_port_max: u16,
        pub _pad3: u32,
    }
}

shared_struct! {
    /// Key of `weft_services`: a frontend and a slot (0 = the service itself).
    pub struct SvcKey {
        pub addr: u32,
        pub port: u16,
        pub slot: u16,
        pub proto: u8,
        pub _pad: [u8; 3],
    }
}

shared_struct! {
    /// Value of `weft_services`.
    pub struct SvcVal {
        pub backend_id: u32,
        pub count: u16,
        pub proxy_port: u16,
        pub flags: u8,
        pub _pad: [u8; 3],
    }
}

shared_struct! {
    /// Value of `weft_backends`.
    pub struct Backend {
        pub addr: u32,
        pub port: u16,
        pub proto: u8,
        pub flags: u8,
    }
}

shared_struct! {
    /// Value of `weft_endpoints` (keyed by the pod's address).
    pub struct Endpoint {
        pub ifindex: u32,
        pub identity: u32,
        pub ep_id: u16,
        pub flags: u8,
        pub _pad: u8,
    }
}

shared_struct! {
    /// Key of the `weft_ipcache` LPM trie (aya wraps it with the prefix length).
    pub struct IpcacheKey {
        pub prefixlen: u32,
        pub addr: u32,
    }
}

shared_struct! {
    /// Value of `weft_ipcache`.
    pub struct IpcacheVal {
        pub identity: u32,
        pub node_addr: u32,
        pub flags: u8,
        pub _pad: [u8; 3],
    }
}

shared_struct! {
    /// Key of `weft_policy`.
    pub struct PolicyKey {
        pub prefixlen: u32,
        pub ep_id: u16,
        pub direction: u8,
        pub _pad0: u8,
        pub identity: u32,
        pub _pad1: u8,
        pub proto: u8,
        pub dport: u16,
    }
}

shared_struct! {
    /// Value of `weft_policy`.
    pub struct PolicyVal {
        pub action: u8,
        pub prefixlen: u8,
        pub proxy_port: u16,
        pub rule_id: u32,
    }
}

/// What follows `prefixlen` in a [`PolicyKey`]: the data of a `weft_policy`
/// trie key as aya's `LpmTrie` takes it (it adds the prefix length itself).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyMatch {
    pub ep_id: u16,
    pub direction: u8,
    pub _pad0: u8,
    pub identity: u32,
    pub _pad1: u8,
    pub proto: u8,
    pub dport: u16,
}

// SAFETY: repr(C), only integer fields, no implicit padding (12 bytes).
unsafe impl aya::Pod for PolicyMatch {}

shared_struct! {
    /// Key of `weft_ct` and `weft_lb`.
    pub struct CtKey {
        pub saddr: u32,
        pub daddr: u32,
        pub sport: u16,
        pub dport: u16,
        pub proto: u8,
        pub scope: u8,
        pub _pad: u16,
    }
}

shared_struct! {
    /// Value of `weft_ct`.
    pub struct CtEntry {
        pub created_ns: u64,
        pub last_seen_ns: u64,
        pub packets_orig: u64,
        pub packets_reply: u64,
        pub bytes_orig: u64,
        pub bytes_reply: u64,
        pub rev_addr: u32,
        pub rev_port: u16,
        pub proxy_port: u16,
        pub snat_addr: u32,
        pub snat_port: u16,
        pub flags: u8,
        pub seen_orig: u8,
        pub seen_reply: u8,
        pub _pad: [u8; 3],
        pub src_identity: u32,
    }
}

shared_struct! {
    /// Value of `weft_lb`.
    pub struct LbEntry {
        pub last_seen_ns: u64,
        pub backend_id: u32,
        pub backend_addr: u32,
        pub backend_port: u16,
        pub svc_port: u16,
        pub nat_addr: u32,
        pub nat_port: u16,
        pub flags: u8,
        pub _pad: u8,
    }
}

shared_struct! {
    /// Value of `weft_sock_rev` (keyed by socket cookie).
    pub struct SockRev {
        pub frontend_addr: u32,
        pub frontend_port: u16,
        pub _pad: u16,
        pub backend_addr: u32,
        pub backend_port: u16,
        pub _pad2: u16,
    }
}

/// One shared struct for the layout check: its C name, its size in Rust, and
/// its fields as (name, offset).
pub type SharedLayout = (&'static str, usize, Vec<(&'static str, usize)>);

/// Every shared struct with its C name and field table, for the layout check.
pub fn shared_layouts() -> Vec<SharedLayout> {
    use std::mem::size_of;
    vec![
        ("weft_event", size_of::<Event>(), Event::layout()),
        ("weft_config", size_of::<Config>(), Config::layout()),
        ("weft_svc_key", size_of::<SvcKey>(), SvcKey::layout()),
        ("weft_svc_val", size_of::<SvcVal>(), SvcVal::layout()),
        ("weft_backend", size_of::<Backend>(), Backend::layout()),
        ("weft_endpoint", size_of::<Endpoint>(), Endpoint::layout()),
        ("weft_ipcache_key", size_of::<IpcacheKey>(), IpcacheKey::layout()),
        ("weft_ipcache_val", size_of::<IpcacheVal>(), IpcacheVal::layout()),
        ("weft_policy_key", size_of::<PolicyKey>(), PolicyKey::layout()),
        ("weft_policy_val", size_of::<PolicyVal>(), PolicyVal::layout()),
        ("weft_ct_key", size_of::<CtKey>(), CtKey::layout()),
        ("weft_ct_entry", size_of::<CtEntry>(), CtEntry::layout()),
        ("weft_lb_entry", size_of::<LbEntry>(), LbEntry::layout()),
        ("weft_sock_rev", size_of::<SockRev>(), SockRev::layout()),
    ]
}

impl Event {
    /// Decodes a ring-buffer record (None if it is too short to be one).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < std::mem::size_of::<Event>() {
            return None;
        }
        // SAFETY: Event is plain old data of that size; read_unaligned copes with any alignment.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
    }

    /// Source address in host form.
    pub fn src(&self) -> std::net::SocketAddrV4 {
        std::net::SocketAddrV4::new(self.saddr.to_ne_bytes().into(), u16::from_be(self.sport))
    }

    /// Destination address in host form.
    pub fn dst(&self) -> std::net::SocketAddrV4 {
        std::net::SocketAddrV4::new(self.daddr.to_ne_bytes().into(), u16::from_be(self.dport))
    }

    /// The address before translation (see the EVF_* flags).
    pub fn orig(&self) -> std::net::SocketAddrV4 {
        std::net::SocketAddrV4::new(self.orig_addr.to_ne_bytes().into(), u16::from_be(self.orig_port))
    }

    /// The SNAT source address (see EVF_XLATED_SRC).
    pub fn nat(&self) -> std::net::SocketAddrV4 {
        std::net::SocketAddrV4::new(self.nat_addr.to_ne_bytes().into(), u16::from_be(self.nat_port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_match_is_a_policy_key_after_its_prefix_length() {
        use std::mem::{offset_of, size_of};
        assert_eq!(size_of::<PolicyMatch>() + 4, size_of::<PolicyKey>());
        let pairs = [
            (offset_of!(PolicyMatch, ep_id), offset_of!(PolicyKey, ep_id)),
            (offset_of!(PolicyMatch, direction), offset_of!(PolicyKey, direction)),
            (offset_of!(PolicyMatch, identity), offset_of!(PolicyKey, identity)),
            (offset_of!(PolicyMatch, proto), offset_of!(PolicyKey, proto)),
            (offset_of!(PolicyMatch, dport), offset_of!(PolicyKey, dport)),
        ];
        for (m, k) in pairs {
            assert_eq!(m + 4, k);
        }
    }
}
