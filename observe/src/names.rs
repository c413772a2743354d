//! Names for the datapath's numbers: observation points, drop reasons, trace
//! reasons, as Hubble spells them.

use weft_ebpf::abi;

/// Hubble's name of an observation point.
pub fn observation_point(obs: u32) -> &'static str {
    match obs {
        abi::OBS_TO_PROXY => "to-proxy",
        abi::OBS_TO_HOST => "to-host",
        abi::OBS_TO_STACK => "to-stack",
        abi::OBS_FROM_ENDPOINT => "from-endpoint",
        abi::OBS_FROM_PROXY => "from-proxy",
        abi::OBS_FROM_HOST => "from-host",
        abi::OBS_FROM_STACK => "from-stack",
        abi::OBS_FROM_NETWORK => "from-network",
        abi::OBS_TO_NETWORK => "to-network",
        abi::OBS_TO_ENDPOINT => "to-endpoint",
        _ => "unknown",
    }
}

/// Hubble's DropReason enum name of a drop code.
pub fn drop_reason(code: u32) -> &'static str {
    match code {
        abi::DROP_INVALID_SOURCE_IP => "INVALID_SOURCE_IP",
        abi::DROP_POLICY_DENIED => "POLICY_DENIED",
        abi::DROP_INVALID_PACKET => "INVALID_PACKET",
        abi::DROP_CT_INVALID_HDR => "CT_INVALID_HDR",
        abi::DROP_UNKNOWN_L3 => "UNKNOWN_L3",
        abi::DROP_WRITE_ERROR => "WRITE_ERROR",
        abi::DROP_UNKNOWN_L4 => "UNKNOWN_L4",
        abi::DROP_CT_CREATE_FAILED => "CT_CREATE_FAILED",
        abi::DROP_FRAG_NOSUPPORT => "FRAG_NOSUPPORT",
        abi::DROP_NO_SERVICE => "NO_SERVICE",
        abi::DROP_NO_FIB => "NO_FIB",
        abi::DROP_PROXY_LOOKUP_FAILED => "PROXY_LOOKUP_FAILED",
        abi::DROP_PROXY_SET_FAILED => "PROXY_SET_FAILED",
        abi::DROP_POLICY_DENY => "POLICY_DENY",
        _ => "DROP_REASON_UNKNOWN",
    }
}

/// Hubble's name of a trace reason.
pub fn trace_reason(r: u32) -> &'static str {
    match r {
        abi::REASON_NEW => "new",
        abi::REASON_ESTABLISHED => "established",
        abi::REASON_REPLY => "reply",
        abi::REASON_RELATED => "related",
        _ => "unknown",
    }
}

/// TCP flags as Hubble prints them (`SYN, ACK`).
pub fn tcp_flags(f: u8) -> String {
    const NAMES: [(u8, &str); 8] = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
        (0x40, "ECE"),
        (0x80, "CWR"),
    ];
    NAMES.iter().filter(|(b, _)| f & b != 0).map(|(_, n)| *n).collect::<Vec<_>>().join(", ")
}

/// One line per record, for `print-events` and debugging.
pub fn event_line(ev: &abi::Event) -> String {
    let proto = match ev.proto {
        6 => "TCP",
        17 => "UDP",
        1 => "ICMP",
        _ => "L4?",
    };
    let flags = if ev.proto == 6 { format!(" Flags: {}", tcp_flags(ev.tcp_flags)) } else { String::new() };
    let ids = format!("(ID:{}) -> (ID:{})", ev.src_identity, ev.dst_identity);
    let xlate = if ev.flags as u32 & abi::EVF_XLATED_DST != 0 {
        format!(" [orig dst {}]", ev.orig())
    } else if ev.flags as u32 & abi::EVF_REVNAT != 0 {
        format!(" [orig src {}]", ev.orig())
    } else {
        String::new()
    };
    let what = match ev.r#type as u32 {
        abi::EV_DROP => format!("DROPPED ({})", drop_reason(ev.subtype as u32)),
        abi::EV_POLICY => format!(
            "policy-verdict:{} {}",
            if ev.subtype as u32 == abi::POLICY_ALLOW { "ALLOWED" } else { "DENIED" },
            if ev.direction as u32 == abi::DIR_INGRESS { "INGRESS" } else { "EGRESS" }
        ),
        abi::EV_SOCK => format!("sock {} ({})", observation_point(ev.subtype as u32), trace_reason(ev.reason as u32)),
        _ => format!("{} FORWARDED ({})", observation_point(ev.subtype as u32), trace_reason(ev.reason as u32)),
    };
    format!("{} -> {} {ids} {what} {proto}{flags}{xlate}", ev.src(), ev.dst())
}
